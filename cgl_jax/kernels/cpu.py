"""CGL's CPU kernels in C++ (XLA FFI): L_g's pair sums and L_s's per-map values.

  pair_l1                     Σ_n |x[..., n, g·f + i_k] − x[..., n, g·f + j_k]| for r pairs
                              and G groups of channels-last maps ``[..., N, C]``: the
                              ``pair_sums`` contract of `losses.group_coherence`
                              (source ``csrc/pair_l1.cc``).
  spatial_concentration_maps  L_s of every map of ψ ``[B, H, W, C]`` → ``[B, C]``: the
                              ``per_map`` contract of `losses.spatial_concentration`
                              (source ``csrc/spatial_concentration.cc``).

Both are reverse-mode differentiable (a backward kernel each), not forward-mode; CPU only,
float32 or float64.

Why kernels: XLA:CPU runs a while loop's iterations one after another on one core, and
each element-wise or reduction pass over ψ as its own single-threaded trip through memory.
  * The pair-sum kernels copy each image's group of channels into a filter-major buffer
    that stays in L2 across all its pairs, so no filter-major copy of ψ is written. The
    backward writes the gradient as filter-major rows, which XLA moves back to
    channels-last inside the pass that consumes it (scattered channels-last stores from
    the kernel are slower).
  * The L_s kernels make two passes over each image's channel slice forward and one
    backward while it is in cache, vectorised over channels; the backward returns four
    coefficients per map and the element-wise gradient is formed in XLA, fused into its
    consumer.
Work is spread over XLA's intra-op threads; every output element has one owner and a fixed
summation order, so results do not depend on the thread count. The pair-sum backward walks
the same filter-sorted incidences as `cgl_jax.kernels.xla.loop_pair_l1` and matches it bit
for bit; forward sums and L_s round differently from XLA's reductions (float rounding).

Build: on first use the sources are compiled with the system C++ compiler (``$CXX`` or
``c++``, flags `FLAGS`, including ``-march=native``) against the FFI headers that ship with
jaxlib, into a cache directory (``$CGL_JAX_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/cgl_jax``
or ``~/.cache/cgl_jax``), keyed by a hash of the sources, the compiler, the flags, jaxlib's
version and this CPU's model and feature flags (``-march=native`` code must not reach
another CPU through a shared home directory). A build is written to a temporary file and
renamed into place, so concurrent processes never load a half-written library. Without a
compiler, or if the build fails, `available()` is False and one warning says why;
`cgl_jax.kernels.select` then picks the XLA loop.

This module imports jax, numpy and the standard library only.
"""
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

Array = jax.Array
_LOG = logging.getLogger(__name__)

SOURCE_DIR = pathlib.Path(__file__).parent / 'csrc'
# -fno-math-errno and -fno-trapping-math let sqrt and division vectorise under a select (no
# result changes: nothing reads errno or the floating-point flags); -w: jaxlib's headers warn.
FLAGS = ('-O3', '-march=native', '-fno-math-errno', '-fno-trapping-math', '-std=c++17',
         '-shared', '-fPIC', '-w')
CACHE_ENV = 'CGL_JAX_KERNEL_CACHE'
BUILD_TIMEOUT_S = 300
# The FFI handlers the library exports, by kernel and dtype: (forward, backward).
TARGETS = {
    kernel: {jnp.dtype(dtype): (f'Cgl{kernel}Forward{suffix}', f'Cgl{kernel}Backward{suffix}')
             for dtype, suffix in ((jnp.float32, 'F32'), (jnp.float64, 'F64'))}
    for kernel in ('PairL1', 'SpatialConcentration')}


def sources(source_dir: os.PathLike = SOURCE_DIR) -> list[pathlib.Path]:
  """The C++ sources compiled into the library (headers are hashed too)."""
  return sorted(pathlib.Path(source_dir).glob('*.cc'))


class KernelBuildError(RuntimeError):
  """The C++ kernel could not be compiled or loaded (the message says why)."""


def cache_dir() -> pathlib.Path:
  """Where built libraries are kept (see the module docstring)."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'cgl_jax'


def default_compiler() -> str:
  """``$CXX``, else ``c++`` or ``g++`` on the PATH."""
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not compiler:
    raise KernelBuildError('no C++ compiler found (set $CXX or install g++ or clang++).')
  return compiler


def _cpu_identity() -> str:
  """This CPU's model and feature flags, so -march=native builds are never shared across CPUs."""
  lines = []
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      for line in cpuinfo:
        if line.startswith(('model name', 'flags', 'Features', 'CPU part')):
          lines.append(line.strip())
        if line.strip() == '':  # the first processor's block is enough
          break
  except OSError:
    pass
  return '\n'.join(lines) or platform.processor() or platform.machine()


def _build_key(compiler: str, source_dir: pathlib.Path) -> str:
  try:
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as error:
    raise KernelBuildError(f'cannot run the C++ compiler {compiler!r}: {error}') from error
  digest = hashlib.sha256()
  files = sources(source_dir) + sorted(source_dir.glob('*.h'))
  for part in (*(f.name.encode() + f.read_bytes() for f in files), version.encode(),
               ' '.join(FLAGS).encode(), jaxlib.__version__.encode(), _cpu_identity().encode()):
    digest.update(part)
    digest.update(b'\0')
  return digest.hexdigest()[:16]


def build(directory: Optional[os.PathLike] = None, *, compiler: Optional[str] = None,
          source_dir: os.PathLike = SOURCE_DIR) -> pathlib.Path:
  """Compiles the kernel library unless a build for this source, compiler and CPU exists.

  Args:
    directory: where to keep it (default `cache_dir()`).
    compiler: the C++ compiler to run (default `default_compiler()`).
    source_dir: the directory of the ``.cc`` and ``.h`` sources (default `SOURCE_DIR`).

  Returns:
    The path of the shared library.

  Raises:
    KernelBuildError: no compiler, or the compiler failed (its command and the
      end of its output are in the message).
  """
  compiler = compiler or default_compiler()
  source_dir = pathlib.Path(source_dir)
  directory = pathlib.Path(directory) if directory is not None else cache_dir()
  library = directory / f'cgl_cpu_kernels-{_build_key(compiler, source_dir)}.so'
  if library.exists():
    return library
  try:
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix='.building-', suffix='.so')
    os.close(handle)
  except OSError as error:
    raise KernelBuildError(f'cannot write the kernel build to {directory}: {error} (set '
                           f'${CACHE_ENV} to a writable directory).') from error
  command = [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', f'-I{source_dir}',
             *map(str, sources(source_dir)), '-o', temporary]
  try:
    try:
      result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
      raise KernelBuildError(f'`{shlex.join(command)}` did not run: {error}') from error
    if result.returncode != 0:
      raise KernelBuildError(f'`{shlex.join(command)}` failed (exit {result.returncode}):\n'
                             f'{(result.stderr or result.stdout)[-2000:]}')
    os.replace(temporary, library)  # atomic: other processes see no library or a whole one
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return library


@functools.cache
def _register() -> None:
  """Builds and loads the library and registers its handlers with XLA (once per process)."""
  library = ctypes.cdll.LoadLibrary(str(build()))
  for by_dtype in TARGETS.values():
    for name in (name for pair in by_dtype.values() for name in pair):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                  platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernels are usable here: built, loaded and registered.

  The first call builds them if needed. A failure is logged once, with the reason.
  """
  try:
    _register()
  except (KernelBuildError, OSError, AttributeError) as error:
    _LOG.warning("cgl_jax: the C++ CPU kernels for L_g and L_s are unavailable, so kernels='auto' "
                 "uses XLA's code on the CPU (same results, slower): %s. Set config.cgl.kernels "
                 "to 'loop' to skip the build and this message.", error)
    return False
  return True


def _targets(kernel: str, x: Array) -> tuple[str, str]:
  """(forward, backward) FFI targets of `kernel` for x's dtype, after checking they can run."""
  if jnp.dtype(x.dtype) not in TARGETS[kernel]:
    raise TypeError(f'the CPU kernels take float32 or float64 values; got {x.dtype}.')
  if not available():
    raise KernelBuildError('the C++ CPU kernels are not available here (see the warning logged '
                           'when they were built).')
  return TARGETS[kernel][jnp.dtype(x.dtype)]


def _check(x: Array, pair_indices: Array, num_groups: int) -> tuple[str, str]:
  if x.ndim < 2:
    raise ValueError(f'x must have rank >= 2 [..., N, C]; got shape {x.shape}.')
  if not 1 <= num_groups <= x.shape[-1]:
    raise ValueError(f'num_groups must lie in [1, C = {x.shape[-1]}]; got {num_groups}.')
  if pair_indices.ndim != 2 or pair_indices.shape[1] != 2:
    raise ValueError(f'pair_indices must have shape [r, 2]; got {pair_indices.shape}.')
  return _targets('PairL1', x)


def _varying_like(out: Array, x: Array) -> Array:
  """out, varying over the mesh axes that x varies over (inside shard_map).

  An FFI call's outputs vary over no mesh axis; a custom VJP's gradient must vary as its
  input does.
  """
  missing = tuple(jax.typeof(x).manual_axis_type.varying
                  - jax.typeof(out).manual_axis_type.varying)
  return jax.lax.pcast(out, missing, to='varying') if missing else out


def _forward(x: Array, pair_indices: Array, num_groups: int) -> Array:
  forward, _ = _check(x, pair_indices, num_groups)
  out = jax.ShapeDtypeStruct((*x.shape[:-2], num_groups, pair_indices.shape[0]), x.dtype)
  # 'sequential': under vmap the kernel runs once per mapped element (pairs stay [r, 2]).
  return _varying_like(jax.ffi.ffi_call(forward, out, vmap_method='sequential')(
      x, pair_indices.astype(jnp.int32), num_groups=np.int64(num_groups)), x)


def pair_l1(x: Array, pair_indices: Array, *, num_groups: int) -> Array:
  """L_g's pair sums over channels-last maps: ``[..., N, C]`` → ``[..., G, r]``.

      out[..., g, k] = Σ_n |x[..., n, g·f + i_k] − x[..., n, g·f + j_k]|,   f = C // G

  for pairs (i_k, j_k) of in-group filter indices; the ``C − G·f`` free channels
  are not read (their gradient is 0). Reverse-mode differentiable (the backward
  kernel recomputes the signs; sign(0) = 0, as for ``jnp.abs``). CPU only;
  float32 or float64. Pair indices are read as jax's dynamic slices read them
  (as the XLA loop does): a negative one counts from the end, then each is
  clamped to ``[0, f)``.
  """
  return _pair_l1(x, jnp.asarray(pair_indices), int(num_groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pair_l1(x, pair_indices, num_groups):
  return _forward(x, pair_indices, num_groups)


def _pair_l1_fwd(x, pair_indices, num_groups):
  return _forward(x, pair_indices, num_groups), (x, pair_indices)


def _pair_l1_bwd(num_groups, residuals, cotangent):
  x, pair_indices = residuals
  _, backward = _check(x, pair_indices, num_groups)
  *leading, positions, channels = x.shape
  group_size = channels // num_groups
  # The kernel writes the gradient filter-major, [..., G, f, N], row by row; XLA
  # moves it back to channels-last inside the pass that consumes it. (Writing it
  # channels-last from the kernel took 3× as long: scattered stores.)
  rows = jax.ffi.ffi_call(
      backward, jax.ShapeDtypeStruct((*leading, num_groups, group_size, positions), x.dtype),
      vmap_method='sequential')(x, pair_indices.astype(jnp.int32), cotangent.astype(x.dtype),
                                num_groups=np.int64(num_groups))
  rows = _varying_like(rows, x)
  grad = jnp.moveaxis(rows, -1, -3).reshape(*leading, positions, num_groups * group_size)
  free = channels - num_groups * group_size  # no gradient
  grad = jnp.pad(grad, [(0, 0)] * (grad.ndim - 1) + [(0, free)]) if free else grad
  return grad, None


_pair_l1.defvjp(_pair_l1_fwd, _pair_l1_bwd)


# ----------------------------------------------------------------------------
# L_s per map.
# ----------------------------------------------------------------------------


def spatial_concentration_maps(psi: Array, eps: float = 1e-4) -> Array:
  """L_s of every map of ψ: ``[B, H, W, C]`` → ``[B, C]`` (`losses.spatial_concentration_maps`).

      m = Σ_j ψ_j + eps,   c = Σ_j j·ψ_j / m,   value = Σ_j ψ_j·‖j − c‖₂ / m

  with the safe square root and divisions of `losses.spatial_concentration` (an
  empty map counts 0, with zero gradient). Reverse-mode differentiable: the
  backward kernel returns four coefficients per map after one pass over ψ, and
  the element-wise gradient is formed here, in XLA, so that it fuses into
  whatever consumes it. CPU only; float32 or float64.
  """
  if psi.ndim != 4:
    raise ValueError(f'psi must have rank 4 [B, H, W, C]; got shape {psi.shape}.')
  _targets('SpatialConcentration', psi)
  return _spatial_concentration_maps(psi, float(eps))


def _spatial_concentration_forward(psi, eps):
  """(values [B, C], moments [3, B, C]: mass, centre row, centre column)."""
  forward, _ = _targets('SpatialConcentration', psi)
  batch, _, _, channels = psi.shape
  out = (jax.ShapeDtypeStruct((batch, channels), psi.dtype),
         jax.ShapeDtypeStruct((3, batch, channels), psi.dtype))
  values, moments = jax.ffi.ffi_call(forward, out, vmap_method='sequential')(psi, eps=eps)
  return _varying_like(values, psi), _varying_like(moments, psi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _spatial_concentration_maps(psi, eps):
  return _spatial_concentration_forward(psi, eps)[0]


def _spatial_concentration_fwd(psi, eps):
  values, moments = _spatial_concentration_forward(psi, eps)
  return values, (psi, moments)


def _spatial_concentration_bwd(eps, residuals, cotangent):
  del eps  # in the moments
  psi, moments = residuals
  _, backward = _targets('SpatialConcentration', psi)
  scale, pull_row, pull_col, offset = jax.ffi.ffi_call(
      backward, jax.ShapeDtypeStruct((4, *cotangent.shape), psi.dtype),
      vmap_method='sequential')(psi, moments, cotangent.astype(psi.dtype))
  scale, pull_row, pull_col, offset = (_varying_like(c, psi)
                                       for c in (scale, pull_row, pull_col, offset))
  _, centre_row, centre_col = moments
  _, height, width, _ = psi.shape
  per_map = lambda x: x[:, None, None, :]  # [B, C] against [B, H, W, C]
  row = jnp.arange(height, dtype=psi.dtype)[:, None, None] - per_map(centre_row)
  col = jnp.arange(width, dtype=psi.dtype)[None, :, None] - per_map(centre_col)
  squared = row * row + col * col
  positive = squared > 0  # the safe square root: distance 0 at the centre
  distance = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1)), 0)
  return (per_map(scale) * distance + per_map(pull_row) * row + per_map(pull_col) * col
            - per_map(offset),)


_spatial_concentration_maps.defvjp(_spatial_concentration_fwd, _spatial_concentration_bwd)
