"""Faster implementations of two inner pieces of `cgl_jax.losses`, by name, and the choice.

L_g's sampled pair sums (the ``pair_sums`` argument of `losses.group_coherence`):

  'jnp'      `losses.pair_l1_sums`: a gather of both filters of every pair (any platform,
             any order of differentiation).
  'loop'     `kernels.xla.loop_pair_l1`: XLA loops over the pairs and, backward, over their
             filter incidences; no per-pair intermediate (suits CPUs).
  'matmul'   `kernels.xla.matmul_pair_l1`: matmuls with the ±1 pair-incidence matrix (suits
             accelerators: TPU, ROCm, several GPUs, float64 on CUDA).
  'cpu_ffi'  `kernels.cpu.pair_l1`: C++ kernels through XLA's FFI (CPU, float32/float64;
             compiled on first use, cached).
  'pallas'   `kernels.pallas.pair_l1`: Pallas/Triton kernels (CUDA, float32).

L_s's per-map values (the ``per_map`` argument of `losses.spatial_concentration`):

  'jnp'      `losses.spatial_concentration_maps`.
  'cpu_ffi'  `kernels.cpu.spatial_concentration_maps` (CPU, float32/float64).

All give the same values to float rounding. Every implementation but 'jnp' has a
hand-written backward pass and is differentiable in reverse mode only: for forward-mode or
higher-order derivatives use 'jnp'. 'cpu_ffi' and 'pallas' are built or imported only when
asked for; `select` picks the fastest usable ones for a platform (``'auto'``).
"""
import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from cgl_jax import losses
from cgl_jax.kernels import xla

PAIR_SUMS = ('jnp', 'loop', 'matmul', 'cpu_ffi', 'pallas')
PER_MAP = ('jnp', 'cpu_ffi')
PLATFORMS = {'cpu_ffi': ('cpu',), 'pallas': ('cuda',)}  # the others run anywhere
CHOICES = ('auto', *PAIR_SUMS)  # the values of config.cgl.kernels


class KernelUnavailableError(RuntimeError):
  """An implementation asked for by name cannot run here (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Selection:
  """Names of implementations: L_g's pair sums (`PAIR_SUMS`), L_s's per-map values (`PER_MAP`)."""
  pair_sums: str
  per_map: str


def _cpu():
  from cgl_jax.kernels import cpu  # pylint: disable=g-import-not-at-top
  if not cpu.available():
    raise KernelUnavailableError(
        "the 'cpu_ffi' kernels did not build or load here (see the warning logged by "
        "cgl_jax.kernels.cpu); use 'loop' or 'jnp' on the CPU.")
  return cpu


def _pallas():
  try:
    from cgl_jax.kernels import pallas  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise KernelUnavailableError(
        "the 'pallas' pair sums need jax.experimental.pallas.triton, which this jaxlib does "
        f"not provide ({error}); use 'matmul'.") from error
  return pallas


def _check_name(name: str, names: tuple[str, ...], what: str) -> None:
  if name not in names:
    raise ValueError(f'unknown {what} implementation {name!r}; choose one of {names}.')


def pair_sums(name: str, *, interpret: bool = False) -> losses.PairSums:
  """The named implementation of L_g's pair sums (`PAIR_SUMS`), for `losses.group_coherence`.

  Args:
    name: one of `PAIR_SUMS`.
    interpret: 'pallas' only: run its kernels in Pallas' interpreter (any backend).

  Raises:
    ValueError: unknown name, or ``interpret`` with another implementation.
    KernelUnavailableError: 'cpu_ffi' did not build, or 'pallas' cannot be imported.
  """
  _check_name(name, PAIR_SUMS, 'pair-sum')
  if interpret and name != 'pallas':
    raise ValueError(f"interpret=True applies to the 'pallas' pair sums only; got {name!r}.")
  if name == 'cpu_ffi':
    return _cpu().pair_l1
  if name == 'pallas':
    return functools.partial(_pallas().pair_l1, interpret=interpret)
  return {'jnp': losses.pair_l1_sums, 'loop': xla.loop_pair_l1,
          'matmul': xla.matmul_pair_l1}[name]


def per_map(name: str) -> losses.PerMap:
  """The named implementation of L_s's per-map values (`PER_MAP`), for `spatial_concentration`."""
  _check_name(name, PER_MAP, 'L_s per-map')
  return _cpu().spatial_concentration_maps if name == 'cpu_ffi' else (
      losses.spatial_concentration_maps)


def available(name: str) -> bool:
  """Whether the named implementation can run here (builds 'cpu_ffi' on first call)."""
  try:
    if name in ('cpu_ffi', 'pallas'):
      (_cpu if name == 'cpu_ffi' else _pallas)()
  except KernelUnavailableError:
    return False
  return True


def select(platform: str, *, num_devices: int, dtype,
           is_available: Callable[[str], bool] = available) -> Selection:
  """The fastest implementations for a platform: what ``'auto'`` runs.

      cpu   one device, float32/float64: 'cpu_ffi' for both where it builds, else
            'loop' and 'jnp'; several devices: 'loop' and 'jnp'
      cuda  one device, float32, Pallas importable: 'pallas'; else 'matmul' (and 'jnp')
      other (tpu, rocm, ...): 'matmul' and 'jnp'

  Several devices get the loop or the matmuls because XLA partitions those over a sharded
  batch, while the C++ and Pallas kernels have no partitioning rule (XLA would gather the
  batch onto every device).

  Args:
    platform: 'cpu', 'cuda', 'rocm', 'tpu', ... (see `current_platform`).
    num_devices: the devices the batch is split over (``jax.device_count()``).
    dtype: the compute dtype of ψ (float32 for bfloat16/float16 models).
    is_available: tells whether a named implementation can run (default `available`).
  """
  dtype = jnp.dtype(dtype)
  single = num_devices == 1
  if platform == 'cpu':
    if single and dtype in (jnp.float32, jnp.float64) and is_available('cpu_ffi'):
      return Selection(pair_sums='cpu_ffi', per_map='cpu_ffi')
    return Selection(pair_sums='loop', per_map='jnp')
  if platform == 'cuda' and single and dtype == jnp.float32 and is_available('pallas'):
    return Selection(pair_sums='pallas', per_map='jnp')
  return Selection(pair_sums='matmul', per_map='jnp')


def resolve(name: str, *, platform: str, num_devices: int, dtype) -> Selection:
  """The implementations that a ``config.cgl.kernels`` value (`CHOICES`) stands for.

  'auto' is `select`; a name of `PAIR_SUMS` picks those pair sums, and the L_s per-map
  implementation of the same name where there is one (else 'jnp').

  Raises:
    ValueError: an unknown name.
    KernelUnavailableError: a name whose kernels do not run on ``platform``.
  """
  _check_name(name, CHOICES, 'kernel')
  if name == 'auto':
    return select(platform, num_devices=num_devices, dtype=dtype)
  if platform not in PLATFORMS.get(name, (platform,)):
    raise KernelUnavailableError(f'the {name!r} kernels run on {PLATFORMS[name]} only; this '
                                 f'platform is {platform!r}.')
  return Selection(pair_sums=name, per_map=name if name in PER_MAP else 'jnp')


def current_platform(device: Optional[jax.Device] = None) -> str:
  """'cpu', 'cuda', 'rocm', 'tpu', ... of ``device`` (default: the first default device)."""
  device = device or jax.devices()[0]
  if device.platform != 'gpu':
    return device.platform
  return 'rocm' if 'rocm' in device.client.platform_version.lower() else 'cuda'
