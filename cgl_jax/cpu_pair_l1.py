"""L_g's sampled pair sums on the CPU as a compiled XLA FFI kernel (C++), forward and backward.

    pair_l1[..., k] = Σ_n |maps[..., i_k, n] − maps[..., j_k, n]|

for r pairs (i_k, j_k) over filter-major maps ``[..., f, N]``. This is what
`cgl_jax.losses.group_coherence(pairs='sampled')` uses when it runs on a single
CPU device (float32 or float64); the source is ``csrc/pair_l1_cpu.cc``.

Why a kernel: XLA:CPU runs a while loop's iterations one after another, on one
core, and nothing else of the step runs beside it, so the loops over the pairs
(forward) and over their filter incidences (backward) sat on the train step's
critical path (8 + 24 ms of the ShapesCNN step on 2 cores). The kernel works
one ``[f, N]`` block (an image's group, 204 KB at f = 51, N = 32×32) at a time,
which stays in L2 across all its pairs, and spreads the blocks over XLA's
intra-op threads: 1.6 + 4.7 ms at that size (``experiments/bench_losses.py``).
Each output element is computed by one thread in a fixed order, so results do
not depend on the thread count; the backward walks the same filter-sorted
incidence list as the XLA loop (`losses._pair_incidences`) and matches it
bit for bit, the forward sums in another order (float rounding).

Build: on first use the source is compiled with the system C++ compiler (``$CXX``
or ``c++``, flags ``-O3 -march=native``) against the FFI headers that ship with
jaxlib, into a cache directory (``$CGL_JAX_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/cgl_jax`` or ``~/.cache/cgl_jax``), keyed by a hash of the source,
the compiler, the flags, jaxlib's version and this CPU's model and feature flags
(``-march=native`` code must not reach another CPU through a shared home
directory). A build is written to a temporary file and renamed into place, so
concurrent processes never load a half-written library. Without a compiler, or
if the build fails, `available()` is False, one warning says why, and
`group_coherence` uses the XLA loop instead (same results).
``CGL_JAX_CPU_KERNEL=0`` turns the kernel off.

This module imports jax and the standard library only.
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

Array = jax.Array

SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'pair_l1_cpu.cc'
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
DISABLE_ENV = 'CGL_JAX_CPU_KERNEL'
CACHE_ENV = 'CGL_JAX_KERNEL_CACHE'
BUILD_TIMEOUT_S = 300
# The FFI handlers the library exports, by dtype: (forward, backward).
TARGETS = {jnp.dtype(jnp.float32): ('CglPairL1ForwardF32', 'CglPairL1BackwardF32'),
           jnp.dtype(jnp.float64): ('CglPairL1ForwardF64', 'CglPairL1BackwardF64')}


class KernelBuildError(RuntimeError):
  """The C++ kernel could not be compiled or loaded (the message says why)."""


def cache_dir() -> pathlib.Path:
  """Where built libraries are kept (see the module docstring)."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'cgl_jax'


def _compiler() -> str:
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


def _build_key(compiler: str) -> str:
  try:
    version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as error:
    raise KernelBuildError(f'cannot run the C++ compiler {compiler!r}: {error}') from error
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), version.encode(), ' '.join(FLAGS).encode(),
               jaxlib.__version__.encode(), _cpu_identity().encode()):
    digest.update(part)
    digest.update(b'\0')
  return digest.hexdigest()[:16]


def build(directory: Optional[os.PathLike] = None) -> pathlib.Path:
  """Compiles the kernel library unless a build for this source, compiler and CPU exists.

  Args:
    directory: where to keep it (default `cache_dir()`).

  Returns:
    The path of the shared library.

  Raises:
    KernelBuildError: no compiler, or the compiler failed (its command and the
      end of its output are in the message).
  """
  compiler = _compiler()
  directory = pathlib.Path(directory) if directory is not None else cache_dir()
  library = directory / f'pair_l1_cpu-{_build_key(compiler)}.so'
  if library.exists():
    return library
  try:
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix='.building-', suffix='.so')
    os.close(handle)
  except OSError as error:
    raise KernelBuildError(f'cannot write the kernel build to {directory}: {error} (set '
                           f'${CACHE_ENV} to a writable directory).') from error
  command = [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', temporary]
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
  for names in TARGETS.values():
    for name in names:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                  platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernel is usable here: built, loaded and registered (False if disabled).

  The first call builds it if needed (seconds). A failure is logged once, with
  the reason, and `group_coherence` then uses the XLA loop on the CPU.
  """
  if os.environ.get(DISABLE_ENV, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return False
  try:
    _register()
  except (KernelBuildError, OSError, AttributeError) as error:
    logging.warning('cgl_jax: the C++ CPU kernel for the pair sums of L_g is unavailable, '
                    'so the XLA loop is used (same results, slower on the CPU): %s. Set %s=0 '
                    'to skip the build and this message.', error, DISABLE_ENV)
    return False
  return True


def _check(maps: Array, pair_indices: Array) -> tuple[str, str]:
  if jnp.dtype(maps.dtype) not in TARGETS:
    raise TypeError(f'the CPU pair-sum kernel takes float32 or float64 maps; got {maps.dtype}.')
  if maps.ndim < 2:
    raise ValueError(f'maps must have rank >= 2 [..., f, N]; got shape {maps.shape}.')
  if pair_indices.ndim != 2 or pair_indices.shape[1] != 2:
    raise ValueError(f'pair_indices must have shape [r, 2]; got {pair_indices.shape}.')
  if not available():
    raise KernelBuildError('the CPU pair-sum kernel is not available (see the warning logged '
                           f'when it was built, or {DISABLE_ENV}).')
  return TARGETS[jnp.dtype(maps.dtype)]


def _forward(maps: Array, pair_indices: Array) -> Array:
  forward, _ = _check(maps, pair_indices)
  out = jax.ShapeDtypeStruct(maps.shape[:-2] + pair_indices.shape[:1], maps.dtype)
  # 'sequential': under vmap the kernel runs once per mapped element (pairs stay [r, 2]).
  return jax.ffi.ffi_call(forward, out, vmap_method='sequential')(
      maps, pair_indices.astype(jnp.int32))


def pair_l1(maps: Array, pair_indices: Array) -> Array:
  """Σ_n |maps[..., i, n] − maps[..., j, n]| per pair (i, j): ``[..., f, N]`` → ``[..., r]``.

  Reverse-mode differentiable (the backward kernel recomputes the signs from
  the maps; sign(0) = 0, as for ``jnp.abs``). CPU only; float32 or float64.
  Pair indices are read as jax's dynamic slices read them (as the XLA loop
  does): a negative one counts from the end, then each is clamped to ``[0, f)``.
  """
  return _pair_l1(maps, jnp.asarray(pair_indices))


@jax.custom_vjp
def _pair_l1(maps, pair_indices):
  return _forward(maps, pair_indices)


def _pair_l1_fwd(maps, pair_indices):
  return _forward(maps, pair_indices), (maps, pair_indices)


def _pair_l1_bwd(residuals, cotangent):
  maps, pair_indices = residuals
  _, backward = _check(maps, pair_indices)
  grad = jax.ffi.ffi_call(backward, jax.ShapeDtypeStruct(maps.shape, maps.dtype),
                          vmap_method='sequential')(
                              maps, pair_indices.astype(jnp.int32),
                              cotangent.astype(maps.dtype))
  return grad, None


_pair_l1.defvjp(_pair_l1_fwd, _pair_l1_bwd)
