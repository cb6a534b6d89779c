"""Concept Group Learning regularizers as pure JAX functions.

Varshneya et al., "Learning Interpretable Concept Groups in CNNs", IJCAI 2021;
the method and the points where the paper and the authors' PyTorch code
(srb-cv/cgl) differ are restated in ``method.md`` of the project spec. Each
docstring below says which variant a function implements.

Conventions:
  * Activations are NHWC, ``[B, H, W, C]``; conv kernels are Flax's
    ``[kh, kw, C_in, C_out]`` (any ``[..., C_out]`` works where noted).
  * A layer with C channels and G groups has ``f = C // G`` filters per group;
    group g holds channels ``[g·f, (g+1)·f)``. The ``C − G·f`` leftover ("free")
    channels are excluded from every group term.
  * Computation runs in at least float32 (bfloat16/float16 inputs are promoted,
    float64 stays float64) and the results have that dtype.
  * Norms and divisions are guarded so that values and gradients stay finite at
    zero (all-zero maps, constant maps, dead filter groups).
  * ``axis_name``: inside ``pmap``/``shard_map``/``vmap`` with a named batch axis,
    batch statistics are summed over that axis with ``jax.lax.psum`` so every
    device gets the value of the full (global) batch.

This module imports jax only (no flax, no TensorFlow, nothing else from cgl_jax)
so other JAX projects can use it on its own. On a single CPU device it also uses
the C++ kernels of `cgl_jax.cpu_kernels` (imported lazily, built on first use)
for L_g's sampled pair sums and for L_s; where they are missing or do not build,
its XLA implementations give the same results.
"""
import functools
import numbers
from typing import Any, Optional, Sequence, Union

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
AxisName = Any  # a hashable mesh / pmap axis name, or a tuple of them
Axis = Union[int, Sequence[int]]

PAIRS = ('exact', 'sampled')
REDUCTIONS = ('per_sample', 'pooled')


# ----------------------------------------------------------------------------
# Validation and small numerics helpers.
# ----------------------------------------------------------------------------


def _compute_dtype(x: Array) -> jnp.dtype:
  """float32 for low-precision inputs, float64 stays float64."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _check_rank(x: Array, name: str, rank: int, layout: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f'{name} must have rank {rank} {layout}; got shape '
                     f'{tuple(jnp.shape(x))}.')


def _check_positive_int(value: Any, name: str, context: str = '') -> None:
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
      or value <= 0):
    raise ValueError(f'{name} must be a positive integer; got {value!r}'
                     f'{context}.')


def _group_size(num_channels: int, num_groups: int, *, name: str,
                shape: Sequence[int]) -> int:
  """f = C // G after checking 0 < G <= C."""
  _check_positive_int(num_groups, 'num_groups', f' ({name} shape {tuple(shape)})')
  if num_groups > num_channels:
    raise ValueError(f'num_groups={num_groups} exceeds the {num_channels} '
                     f'channels of {name} with shape {tuple(shape)}.')
  return num_channels // num_groups


def _safe_sqrt(x: Array) -> Array:
  """sqrt(x) for x >= 0 whose gradient at x = 0 is 0 instead of inf."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, and 0 (with zero gradient) where denominator == 0."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def _norm_powers(x: Array, order: float) -> Array:
  """|x|^order element-wise (|x| for inf): the terms a norm accumulates."""
  if order == 2:
    return jnp.square(x)
  magnitude = jnp.abs(x)
  return magnitude if order in (1, float('inf')) else magnitude**order


def _norm_accumulate(terms: Array, order: float, axis: Axis) -> Array:
  """Sums (max for inf) the `_norm_powers` terms over `axis`."""
  return jnp.max(terms, axis=axis) if order == float('inf') else jnp.sum(terms, axis=axis)


def _norm_root(total: Array, order: float) -> Array:
  """total^(1/order) with zero (not NaN/inf) gradient at total = 0."""
  if order in (1, float('inf')):
    return total
  if order == 2:
    return _safe_sqrt(total)
  positive = total > 0
  return jnp.where(positive, jnp.where(positive, total, 1)**(1.0 / order), 0)


def _vector_norm(x: Array, order: float, axis: Axis) -> Array:
  """Safe ℓ_order norm (order >= 1 or inf) of x over `axis`."""
  return _norm_root(_norm_accumulate(_norm_powers(x, order), order, axis), order)


def _check_norm_order(value: Any, name: str) -> None:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not value >= 1):
    raise ValueError(f'{name} must be a real number >= 1 (or inf); got {value!r}.')


def _batch_sum(x: Any, axis_name: Optional[AxisName]) -> Any:
  """Sums a pytree over the named batch axis (identity when axis_name is None)."""
  return x if axis_name is None else lax.psum(x, axis_name)


def _soft_jaccard_from_l1(diff: Array, norm_p: Array, norm_q: Array) -> Array:
  """D = 2·‖p−q‖₁ / (‖p‖₁ + ‖q‖₁ + ‖p−q‖₁) from the three L1 norms (0 when all are 0)."""
  return _safe_divide(2 * diff, norm_p + norm_q + diff)


# ----------------------------------------------------------------------------
# Soft masks.
# ----------------------------------------------------------------------------


def soft_masks(preact: Array, *, scale: Union[float, Array] = 1.0,
               shift: Union[float, Array] = 0.0, eps: float = 5e-3,
               axis_name: Optional[AxisName] = None) -> Array:
  """Soft masks ψ of pre-activations (the paper's "soft receptive fields").

      ψ = sigmoid(scale · a / (S_c + eps) + shift)

  where S_c is the standard deviation of channel c over the batch and both
  spatial axes with ddof = 1 (not stopped from the gradient). This is the
  variant without batch norm; paper and authors' code agree on it. ``scale``
  and ``shift`` are the paper's P1, P2 (fixed to 1, 0 in the authors' code; pass
  learned scalars to learn them).

  Args:
    preact: ``[B, H, W, C]`` conv output before the non-linearity.
    scale: P1, a scalar (Python number or array).
    shift: P2, a scalar.
    eps: added to S_c (5e-3 as in the authors' code).
    axis_name: named batch axis (pmap/shard_map/vmap); S_c is then taken over the
      global batch, i.e. the ``N = B·H·W`` samples of every device.

  Returns:
    ψ in (0, 1), ``[B, H, W, C]``, in the compute dtype (>= float32).
  """
  _check_rank(preact, 'preact', 4, '[B, H, W, C]')
  x = jnp.asarray(preact).astype(_compute_dtype(preact))
  local_count = x.shape[0] * x.shape[1] * x.shape[2]
  if axis_name is None and local_count < 2:
    raise ValueError('soft_masks needs at least 2 values per channel for the '
                     f'ddof=1 standard deviation; preact has shape {x.shape}.')
  total, count = _batch_sum(
      (jnp.sum(x, axis=(0, 1, 2)), jnp.asarray(local_count, x.dtype)), axis_name)
  mean = total / count
  # Two passes (mean, then squared deviations) for accuracy with large means.
  squared_deviation = _batch_sum(
      jnp.sum(jnp.square(x - mean), axis=(0, 1, 2)), axis_name)
  std = _safe_sqrt(squared_deviation / (count - 1))
  return jax.nn.sigmoid(scale * x / (std + eps) + shift)


def soft_masks_bn(bn_out: Array, gamma: Array, *,
                  scale: Union[float, Array] = 1.0,
                  shift: Union[float, Array] = 0.0,
                  eps: float = 1e-3) -> Array:
  """Soft masks ψ of a batch-norm output (the paper's "Alexnet-B" form).

      ψ = sigmoid(scale · y / γ̃_c + shift),   γ̃ = sign(γ) · max(|γ|, eps)

  with y the BN output and γ the BN scale, so that y / γ is the normalised,
  un-scaled activation plus β/γ (the paper's τ = y/γ). ``sign(0)`` counts as +.
  The authors' code divides by the BN running variance instead; pass that
  array as ``gamma`` to get their form.

  Args:
    bn_out: ``[B, H, W, C]`` batch-norm output (before the non-linearity).
    gamma: ``[C]`` BN scale.
    scale: P1, a scalar.
    shift: P2, a scalar.
    eps: lower bound on |γ| (the guard against division by ~0).

  Returns:
    ψ in (0, 1), ``[B, H, W, C]``, in the compute dtype (>= float32).
  """
  _check_rank(bn_out, 'bn_out', 4, '[B, H, W, C]')
  if jnp.shape(gamma) != (bn_out.shape[-1],):
    raise ValueError(f'gamma must have shape [C] = ({bn_out.shape[-1]},) to '
                     f'match bn_out with shape {tuple(bn_out.shape)}; got shape '
                     f'{tuple(jnp.shape(gamma))}.')
  dtype = jnp.promote_types(_compute_dtype(bn_out), _compute_dtype(gamma))
  y = jnp.asarray(bn_out).astype(dtype)
  gamma = jnp.asarray(gamma).astype(dtype)
  small = jnp.abs(gamma) < eps
  guarded_gamma = jnp.where(small, jnp.where(gamma < 0, -eps, eps), gamma)
  return jax.nn.sigmoid(scale * y / guarded_gamma + shift)


# ----------------------------------------------------------------------------
# Group coherence L_g.
# ----------------------------------------------------------------------------


def soft_jaccard_distance(p: Array, q: Array, *, axis: Axis) -> Array:
  """Soft Jaccard distance between (soft) masks, a soft 1 − IoU.

      D(p, q) = 2·‖p − q‖₁ / (‖p‖₁ + ‖q‖₁ + ‖p − q‖₁)

  with the L1 norms over ``axis``. For binary masks D = 1 − |p ∩ q| / |p ∪ q|
  exactly; two all-zero masks have D = 0 (by convention, with zero gradient).
  Paper and authors' code agree on this formula.

  Args:
    p, q: broadcast-compatible arrays, e.g. ``[B, H, W]`` soft masks.
    axis: the axis or axes the norms run over, e.g. ``(1, 2)`` for per-image D.

  Returns:
    D in [0, 1] for non-negative inputs, with ``axis`` reduced away.
  """
  dtype = jnp.promote_types(_compute_dtype(p), _compute_dtype(q))
  p = jnp.asarray(p).astype(dtype)
  q = jnp.asarray(q).astype(dtype)
  return _soft_jaccard_from_l1(
      jnp.sum(jnp.abs(p - q), axis=axis),
      jnp.sum(jnp.abs(p), axis=axis),
      jnp.sum(jnp.abs(q), axis=axis))


def sample_pairs(key: Array, num_filters: int, num_pairs: int) -> Array:
  """Draws ordered filter pairs (i, j), i ≠ j, uniformly with replacement.

  ``i`` is uniform on ``[0, f)`` and ``j = (i + 1 + u) mod f`` with u uniform on
  ``[0, f − 1)``, so each of the ``f·(f−1)`` ordered pairs has probability
  ``1 / (f·(f−1))``. This is what ``group_coherence(..., pairs='sampled')`` uses.

  Args:
    key: a JAX PRNG key.
    num_filters: f >= 2, filters per group.
    num_pairs: r >= 1, the number of pairs.

  Returns:
    int32 ``[r, 2]``: column 0 holds i, column 1 holds j.
  """
  _check_positive_int(num_pairs, 'num_pairs')
  _check_positive_int(num_filters, 'num_filters')
  if num_filters < 2:
    raise ValueError(f'num_filters must be >= 2 to form pairs i != j; got '
                     f'{num_filters}.')
  first_key, offset_key = jax.random.split(key)
  first = jax.random.randint(first_key, (num_pairs,), 0, num_filters)
  offset = jax.random.randint(offset_key, (num_pairs,), 1, num_filters)
  return jnp.stack([first, (first + offset) % num_filters], axis=1).astype(jnp.int32)


def _zeros_varying_like(x: Array, shape: Sequence[int]) -> Array:
  """Zeros of x's dtype and the given shape, as device-varying as x.

  A loop carry inside ``shard_map`` must vary over the same mesh axes in and
  out; ``jnp.zeros`` is not varying, a select on x is (and stays exactly 0 even
  where x is NaN; XLA folds it to a constant).
  """
  return jnp.broadcast_to(jnp.where(False, x.reshape(-1)[0], jnp.zeros((), x.dtype)), shape)


def _identity_outside_ynnpack(x: Array) -> Array:
  """x unchanged (rounded to its own dtype's precision), as an op XLA:CPU keeps off YNNPACK.

  XLA:CPU hands an element-wise-and-reduce fusion to YNNPACK, which cannot read a
  dynamic slice, so the two filter rows of a pair were first copied out and then
  reduced. With this op inside, XLA fuses slices, difference and sum into one pass:
  the forward pair loop went from 13.8 to 8 ms (ShapesCNN conv2, 2 cores), and the
  CGL train step gained 10–23 ms in two A/B runs. Elsewhere (no YNNPACK, or an XLA
  that folds the no-op away) it changes nothing.
  """
  info = jnp.finfo(x.dtype)
  return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _filter_major_pair_l1(maps: Array, pair_indices: Array) -> Array:
  """Σ_n |maps[..., i, n] − maps[..., j, n]| per pair (i, j): ``[..., f, N]`` → ``[r, ...]``.

  A loop over the pairs, each step reading the two ``[..., N]`` slices of its
  filters, so no ``[r, ..., N]`` tensor of differences is ever materialised.
  """
  filter_axis = maps.ndim - 2

  def pair_step(k, out):
    first = lax.dynamic_index_in_dim(maps, pair_indices[k, 0], filter_axis, keepdims=False)
    second = lax.dynamic_index_in_dim(maps, pair_indices[k, 1], filter_axis, keepdims=False)
    distance = _identity_outside_ynnpack(jnp.abs(first - second))
    return lax.dynamic_update_index_in_dim(out, jnp.sum(distance, axis=-1), k, 0)

  num_pairs = pair_indices.shape[0]
  return lax.fori_loop(0, num_pairs, pair_step,
                       _zeros_varying_like(maps, (num_pairs, *maps.shape[:-2])))


def _filter_major_pair_l1_fwd(maps, pair_indices):
  return _filter_major_pair_l1(maps, pair_indices), (maps, pair_indices)


def _pair_incidences(pair_indices: Array, num_filters: int):
  """The pairs as a filter-sorted incidence list, for backward passes that visit filters in turn.

  Pair k = (i, j) gives two incidences, (owner i, other j, pair k) and (owner j,
  other i, pair k), sorted by owner with a stable sort: within a filter, the pairs
  where it is first, then those where it is second, each in pair order.

  Args:
    pair_indices: int ``[r, 2]`` pairs (i, j) of filter indices in ``[0, f)``.
    num_filters: f.

  Returns:
    ``(starts, owner, other, pair)``: int32 ``[f + 1]`` where filter f's incidences
    are ``starts[f]:starts[f + 1]``, and int32 ``[2r]`` owner filter, other filter
    and pair index of each incidence.
  """
  num_pairs = pair_indices.shape[0]
  pair_indices = jnp.asarray(pair_indices).astype(jnp.int32)
  owner = jnp.concatenate([pair_indices[:, 0], pair_indices[:, 1]])
  other = jnp.concatenate([pair_indices[:, 1], pair_indices[:, 0]])
  pair = jnp.concatenate([jnp.arange(num_pairs, dtype=jnp.int32)] * 2)
  order = jnp.argsort(owner, stable=True)
  # Counts by comparison, not jnp.searchsorted: its while loop added ~0.1 ms per
  # call on an H100; this is one small fusion.
  counts = jnp.sum(owner[:, None] == jnp.arange(num_filters, dtype=jnp.int32), axis=0)
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
  return starts, owner[order], other[order], pair[order]


def _filter_major_pair_l1_bwd(residuals, cotangent):
  """∂/∂maps[f] = Σ over f's incidences (f, o, k) of c_k·sign(maps[f] − maps[o]).

  For pair k = (i, j) that is c_k·sign(m_i − m_j) into filter i and −c_k·sign(m_i −
  m_j) = c_k·sign(m_j − m_i) into filter j; sign(0) = 0 as for ``jnp.abs``'s
  derivative. One loop step per incidence (2r), in filter order
  (`_pair_incidences`): consecutive steps add into the same gradient row and read
  the same own row, which stay in cache, so each step streams only the other
  filter's row. On the CPU (2 cores, ShapesCNN conv2) this took the CGL train
  step from 1.112 to 1.101× the cross-entropy step against the loop over pairs
  (which read both rows and updated both gradient rows per pair); the summation
  order per filter is fixed, so results stay deterministic.
  """
  maps, pair_indices = residuals
  filter_axis = maps.ndim - 2
  _, owner, other, pair = _pair_incidences(pair_indices, maps.shape[filter_axis])

  def incidence_step(m, grad):
    own = lax.dynamic_index_in_dim(maps, owner[m], filter_axis, keepdims=False)
    partner = lax.dynamic_index_in_dim(maps, other[m], filter_axis, keepdims=False)
    slope = cotangent[pair[m]][..., None] * jnp.sign(own - partner)
    return grad.at[(slice(None),) * filter_axis + (owner[m],)].add(slope)

  grad = lax.fori_loop(0, owner.shape[0], incidence_step,
                       _zeros_varying_like(maps, maps.shape))
  return grad, None


# Reverse mode only: the backward pass recomputes each pair's signs from the
# maps instead of keeping an [r, ..., N] tensor of differences.
_filter_major_pair_l1 = jax.custom_vjp(_filter_major_pair_l1)
_filter_major_pair_l1.defvjp(_filter_major_pair_l1_fwd, _filter_major_pair_l1_bwd)


def _filter_major(maps: Array) -> Array:
  """``[B, HW, G, f]`` → ``[B, G, f, HW]``: each filter's map one contiguous row.

  One batched 2-D transpose of each image's ``[HW, C]``, which XLA fuses into the
  producer of ψ; the 4-D permutation to ``[f, B, G, HW]`` took four times as long.
  """
  batch, positions, groups, group_size = maps.shape
  return maps.reshape(batch, positions, groups * group_size).transpose(0, 2, 1).reshape(
      batch, groups, group_size, positions)


def _loop_pair_l1(maps: Array, pair_indices: Array) -> Array:
  """Σ_hw |maps[:, hw, :, i] − maps[:, hw, :, j]| per pair: [B, HW, G, f] → [B, G, r] (CPU).

  Over the filter-major maps (`_filter_major`), the forward pass visits the
  pairs one by one and the backward pass the filters' incidences
  (`_filter_major_pair_l1`): no per-pair intermediate. The one-hot matmul of
  `_matmul_pair_l1` does f/2 times the arithmetic of a difference and writes
  B·HW·G·r differences forward and backward: at B = 32, 32×32, G = 5, f = 51,
  r = 153 its value-and-grad took 223 ms of one CPU thread, the loop 119 ms.
  The C++ kernels (`_cpu_kernel_channels_last_pair_l1`) replace this loop where they build.
  """
  return jnp.moveaxis(_filter_major_pair_l1(_filter_major(maps), pair_indices), 0, -1)


@functools.cache
def _cpu_kernel_module():
  """`cgl_jax.cpu_kernels` if its C++ kernels build and load here, else None.

  Also None where this module was copied without the rest of cgl_jax: the XLA
  implementations then serve the CPU.
  """
  try:
    from cgl_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return cpu_kernels if cpu_kernels.available() else None


def _use_cpu_kernels(x: Array) -> bool:
  """Whether the CPU branch of a `lax.platform_dependent` may call `cgl_jax.cpu_kernels` for x.

  Only on a single device (the kernels have no partitioning rule: XLA would
  gather a sharded batch onto every device), for float32/float64, where the
  CPU is the default backend (a GPU host does not build kernels it would not
  use) and the kernels build.
  """
  return (jax.device_count() == 1 and jax.default_backend() == 'cpu'
          and x.dtype in (jnp.float32, jnp.float64) and _cpu_kernel_module() is not None)


def _cpu_kernel_channels_last_pair_l1(x: Array, pair_indices: Array, num_groups: int) -> Array:
  """`_loop_pair_l1` as C++ XLA FFI kernels over ψ itself, ``[B, HW, C]`` (`cgl_jax.cpu_kernels`).

  The loops run one iteration at a time on one core and nothing else of the
  step runs beside them; the kernels copy each image's group into an L2-sized
  filter-major buffer, keep it there across the pairs, and use all of XLA's
  intra-op threads. Reading ψ channels-last (free channels included) saves the
  filter-major copy of ψ that the loop needs. In the ShapesCNN train step (conv2:
  B = 32, 32×32, G = 5, f = 51, r = 153; 2 cores): forward 4.5 ms against 8 ms
  for the loop plus a 6 ms transpose, backward 7.4 against 22 ms.
  """
  module = _cpu_kernel_module()
  if module is None:
    raise ImportError('the C++ CPU pair-sum kernel did not build or load here (see the '
                      'warning logged by cgl_jax.cpu_kernels); use the loop pair sums.')
  return module.pair_l1(x, pair_indices, num_groups=num_groups)


def _cpu_kernel_pair_l1(maps: Array, pair_indices: Array) -> Array:
  """`_cpu_kernel_channels_last_pair_l1` with the interface of `SAMPLED_PAIR_SUMS`: [B, HW, G, f]."""
  batch, positions, groups, group_size = maps.shape
  return _cpu_kernel_channels_last_pair_l1(
      maps.reshape(batch, positions, groups * group_size), pair_indices, groups)


def _pair_incidence(pair_indices: Array, num_filters: int, dtype) -> Array:
  """E = one_hot(i) − one_hot(j) per pair (i, j): ``[r, 2]`` → ``[r, f]``, entries 0, ±1."""
  return (jax.nn.one_hot(pair_indices[:, 0], num_filters, dtype=dtype)
          - jax.nn.one_hot(pair_indices[:, 1], num_filters, dtype=dtype))


def _pair_differences(maps: Array, incidence: Array) -> Array:
  """maps[..., i] − maps[..., j] per pair, ``[B, HW, G, f]`` → ``[B, HW, G, r]``.

  A matmul with the ±1 incidence matrix at full float32 precision (no TF32 or
  one-pass bf16), so each entry is the exactly rounded difference.
  """
  return jnp.einsum('bngf,rf->bngr', maps, incidence, precision=lax.Precision.HIGHEST)


def _matmul_pair_l1(maps: Array, pair_indices: Array) -> Array:
  """`_loop_pair_l1` as two matmuls with the pair incidence matrix (TPU, ROCm, float64 on CUDA).

  Forward: the differences of all r pairs in the native layout (no transpose),
  their absolute values summed over HW. Backward (custom VJP): the same
  differences recomputed, ``slope = c·sign(diff)`` and ``grad = slope @ E``, one
  deterministic matmul instead of scatter-adds. Transient memory: one
  ``[B, HW, G, r]`` tensor (r/f times ψ). On accelerators a loop over the pairs
  is bound by per-iteration launch latency; these are four kernels. Measured on
  an H200 (value-and-grad of L_g + L_s, ψ [32, 32, 32, 256], G = 5, r = 153):
  0.88 ms, against 7.5 ms for the loop, 1.8 ms for a fused gather forward with
  a dense Σ_j W_ij·sign(m_i − m_j) backward, and 1.1 ms for that gather forward
  with this backward (experiments/bench_losses.py, experiments/README.md).
  On CUDA the Pallas kernels (`_pallas_pair_l1`) replaced them: on an H100 the
  vjp of the pair sums alone takes 0.23 ms with the kernels against 0.49 ms with
  these matmuls at this size, 0.13–0.14 against 0.14–0.20 ms at AlexNet's 13×13.
  The same matmuls on bf16 tensor cores with the operands split in three
  (``DotAlgorithmPreset.BF16_BF16_F32_X6``, still exact here) took 0.7 ms at
  this size but 1.06× the time at AlexNet's, and changed the whole train step
  by under 2 %, either way; not adopted.
  """
  incidence = _pair_incidence(pair_indices, maps.shape[-1], maps.dtype)
  return jnp.sum(jnp.abs(_pair_differences(maps, incidence)), axis=1)


def _matmul_pair_l1_fwd(maps, pair_indices):
  return _matmul_pair_l1(maps, pair_indices), (maps, pair_indices)


def _matmul_pair_l1_bwd(residuals, cotangent):
  maps, pair_indices = residuals
  incidence = _pair_incidence(pair_indices, maps.shape[-1], maps.dtype)
  slope = cotangent[:, None] * jnp.sign(_pair_differences(maps, incidence))  # [B, HW, G, r]
  grad = jnp.einsum('bngr,rf->bngf', slope, incidence, precision=lax.Precision.HIGHEST)
  return grad, None


_matmul_pair_l1 = jax.custom_vjp(_matmul_pair_l1)
_matmul_pair_l1.defvjp(_matmul_pair_l1_fwd, _matmul_pair_l1_bwd)


@functools.cache
def _pallas_module():
  """`cgl_jax.pallas_pair_l1`, or None where this jaxlib lacks Pallas' Triton bindings."""
  try:
    from cgl_jax import pallas_pair_l1  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return pallas_pair_l1


def _pallas_pair_l1(maps: Array, pair_indices: Array) -> Array:
  """`_loop_pair_l1` as two Pallas/Triton kernels (CUDA; float32): `cgl_jax.pallas_pair_l1`."""
  module = _pallas_module()
  if module is None:
    raise ImportError('the Pallas pair sums need jax.experimental.pallas.triton, which this '
                      'jaxlib does not provide; use the loop or matmul pair sums.')
  return module.pallas_pair_l1(maps, pair_indices)


# The implementations of the 'sampled' pair sums, by name (tests and benchmarks force one).
SAMPLED_PAIR_SUMS = {'loop': _loop_pair_l1, 'cpu_kernel': _cpu_kernel_pair_l1,
                     'matmul': _matmul_pair_l1, 'pallas': _pallas_pair_l1}


def _grouped_maps(x: Array, num_groups: int) -> Array:
  """ψ channels-last ``[B, HW, C]`` → its grouped filters ``[B, HW, G, f]`` (free ones dropped)."""
  batch, positions, channels = x.shape
  group_size = channels // num_groups
  return x[..., :num_groups * group_size].reshape(batch, positions, num_groups, group_size)


def grouped_pair_sums(implementation):
  """A `SAMPLED_PAIR_SUMS` implementation ([B, HW, G, f] maps) with `_sampled_pair_l1`'s interface.

  For tests and benchmarks that force one implementation by patching
  ``losses._sampled_pair_l1``.
  """
  def pair_sums(x, pair_indices, *, num_groups):
    return implementation(_grouped_maps(x, num_groups), pair_indices)
  return pair_sums


def _sampled_pair_l1(x: Array, pair_indices: Array, *, num_groups: int) -> Array:
  """Σ_hw |maps[:, hw, :, i] − maps[:, hw, :, j]| per pair: ψ [B, HW, C] → [B, G, r].

  ``maps = _grouped_maps(x, num_groups)``: the first G·f channels of ψ. Chosen
  when lowering for the device, so one traced function serves all:
    CPU   the C++ kernels on ψ itself (`_cpu_kernel_channels_last_pair_l1`) on a
          single CPU device where they build, else the loop (`_loop_pair_l1`);
    CUDA  the Pallas kernels (`_pallas_pair_l1`) on a single GPU with float32
          maps, else the matmuls (`_matmul_pair_l1`);
    other the matmuls (TPU, ROCm).
  They agree to float rounding. Several devices get the loop or the matmuls
  because XLA partitions those over a sharded batch, while the kernels have no
  partitioning rule yet (XLA would gather the batch onto every device).
  """
  single_device = jax.device_count() == 1
  single_cuda_kernel = (x.dtype == jnp.float32 and single_device
                        and _pallas_module() is not None)
  if _use_cpu_kernels(x):
    cpu = _cpu_kernel_channels_last_pair_l1
  else:
    cpu = grouped_pair_sums(SAMPLED_PAIR_SUMS['loop'])
  cuda = grouped_pair_sums(SAMPLED_PAIR_SUMS['pallas' if single_cuda_kernel else 'matmul'])
  default = grouped_pair_sums(SAMPLED_PAIR_SUMS['matmul'])
  return lax.platform_dependent(
      x, pair_indices, cpu=functools.partial(cpu, num_groups=num_groups),
      cuda=functools.partial(cuda, num_groups=num_groups),
      default=functools.partial(default, num_groups=num_groups))


def _shifted_pair_l1(maps: Array, shifts: Array) -> Array:
  """Σ_hw |maps[:, hw, :, i] − maps[:, hw, :, (i + k) mod f]| for every i and shift k.

  A ``lax.scan`` over the shifts, one rematerialised step per shift, so neither
  the forward nor the backward pass holds more than about three arrays of the
  size of ``maps`` (no ``f × f × H × W`` intermediate).

  Args:
    maps: ``[B, HW, G, f]``.
    shifts: int ``[K]`` with values in ``[1, f)``.

  Returns:
    ``[B, G, K·f]``, pair index ``k_index · f + i``.
  """
  maps = maps.transpose(0, 2, 3, 1)  # [B, G, f, HW]: each filter's map contiguous
  filters = jnp.arange(maps.shape[2])

  @jax.checkpoint
  def l1_to_shifted(shift):
    # A gather (not jnp.roll): its transpose accumulates into one buffer.
    shifted = jnp.take(maps, (filters + shift) % maps.shape[2], axis=2)
    return jnp.sum(jnp.abs(maps - shifted), axis=-1)  # [B, G, f]

  _, per_shift = lax.scan(lambda carry, k: (carry, l1_to_shifted(k)), None, shifts)
  batch, groups = maps.shape[:2]
  return jnp.moveaxis(per_shift, 0, 2).reshape(batch, groups, -1)


def _exact_pairs(num_filters: int) -> tuple[Array, Array, Array]:
  """Shifts, pair indices and weights that average D over all ordered pairs.

  D is symmetric, so the f·(f−1) ordered pairs (i, i+k mod f), k = 1 … f−1, are
  covered by the shifts k = 1 … ⌊f/2⌋: shift k stands for itself and for f − k
  (weight 2), except k = f/2 for even f, which is its own mirror (weight 1).

  Returns:
    shifts int ``[K]``, pair_indices int ``[K·f, 2]`` (order k-major, as
    `_shifted_pair_l1` lays them out) and weights ``[K·f]`` summing to 1.
  """
  shifts = jnp.arange(1, num_filters // 2 + 1, dtype=jnp.int32)
  weight_per_shift = jnp.where(2 * shifts == num_filters, 1.0, 2.0) / (
      num_filters * (num_filters - 1))
  first = jnp.tile(jnp.arange(num_filters, dtype=jnp.int32), shifts.shape[0])
  second = (first + jnp.repeat(shifts, num_filters)) % num_filters
  weights = jnp.repeat(weight_per_shift, num_filters)
  return shifts, jnp.stack([first, second], axis=1), weights


def group_coherence(psi: Array, num_groups: int, *, pairs: str = 'exact',
                    key: Optional[Array] = None,
                    num_pairs: Optional[int] = None,
                    pair_indices: Optional[Array] = None,
                    reduction: str = 'per_sample',
                    axis_name: Optional[AxisName] = None) -> Array:
  """Group coherence: mean soft Jaccard distance D between filters of a group.

  For group g (channels ``[g·f, (g+1)·f)``, f = C // G, free channels ignored)
  and a set of ordered pairs (i, j), i ≠ j, of its filters:

      per_sample: value_g = mean_{pairs} mean_b D(ψ_b[..., g·f+i], ψ_b[..., g·f+j])
                  (norms over H×W per image; the authors' code; default)
      pooled:     value_g = mean_{pairs} D(ψ[..., g·f+i], ψ[..., g·f+j])
                  (norms over B×H×W; the paper's text)

  The layer's L_g is ``value.sum()`` (the network's: mean over layers).

  Pairs:
    'sampled' (paper and code): ``num_pairs`` (default 3·f) ordered pairs drawn
      uniformly from ``key`` with `sample_pairs`, the same pairs for every group
      (as in the authors' code); or the explicit ``pair_indices``. Time
      O(B·H·W·G·r), with a custom (reverse-mode only) gradient. On a single
      CPU device two C++ kernels (`cgl_jax.cpu_kernels`, built on first use;
      without a compiler, or on several CPU devices, XLA loops over the pairs
      and over their filter incidences): peak memory of value-and-grad
      ≈ 2·B·H·W·G·f values (the filter-major maps and their gradient), no
      per-pair intermediate. On a single CUDA GPU (float32) two Pallas/Triton
      kernels over a filter-major copy of the maps (`cgl_jax.pallas_pair_l1`),
      the same memory. On TPU, ROCm, several GPUs or in float64 on CUDA two
      matmuls with the ±1
      pair-incidence matrix (a loop there is bound by launch latency): one
      transient ``[B, H·W, G, r]`` tensor, r/f times the size of ψ.
    'exact' (ours): all f·(f−1) ordered pairs. A ``lax.scan`` over the ⌊f/2⌋
      filter shifts (D is symmetric), each step rematerialised in the backward
      pass: time O(B·H·W·G·f²/2), peak memory of value-and-grad ≈ 3·B·H·W·G·f
      values (transposed input, gradient accumulator, one step's difference)
      plus the ``B·G·f²/2`` per-pair sums, whatever f. E.g. f = 100, B = 256,
      13×13, G = 5: ≈ 0.3 GB at float32, where a materialised pairwise tensor
      would take 43 GB.
    The expectation of 'sampled' over keys equals 'exact'.

  Args:
    psi: ``[B, H, W, C]`` soft masks (e.g. from `soft_masks`).
    num_groups: G, with 1 <= G and f = C // G >= 2.
    pairs: 'exact' or 'sampled'.
    key: PRNG key for 'sampled' (ignored by 'exact').
    num_pairs: r for 'sampled' (default 3·f).
    pair_indices: int ``[r, 2]`` explicit pairs (i, j) of in-group filter
      indices in ``[0, f)`` for 'sampled', instead of ``key``/``num_pairs``
      (checked when not traced).
    reduction: 'per_sample' or 'pooled'.
    axis_name: named batch axis; the mean over images ('per_sample') or the
      sums over the batch ('pooled') then cover the global batch.

  Returns:
    ``[G]`` per-group values in the compute dtype (>= float32), each in [0, 1].
  """
  _check_rank(psi, 'psi', 4, '[B, H, W, C]')
  batch, height, width, channels = psi.shape
  group_size = _group_size(channels, num_groups, name='psi', shape=psi.shape)
  if group_size < 2:
    raise ValueError(f'group_coherence needs >= 2 filters per group; psi with '
                     f'shape {tuple(psi.shape)} and num_groups={num_groups} '
                     f'gives {group_size}.')
  if reduction not in REDUCTIONS:
    raise ValueError(f'reduction must be one of {REDUCTIONS}; got {reduction!r}.')
  if pairs not in PAIRS:
    raise ValueError(f'pairs must be one of {PAIRS}; got {pairs!r}.')

  # ψ as [B, H·W, C] (a reshape, no copy); the pair sums take the first G·f channels.
  x = jnp.asarray(psi).astype(_compute_dtype(psi)).reshape(batch, height * width, channels)

  if pairs == 'exact':
    if num_pairs is not None or pair_indices is not None:
      raise ValueError("num_pairs and pair_indices apply to pairs='sampled' only; "
                       f"got num_pairs={num_pairs!r}, pair_indices "
                       f"{'given' if pair_indices is not None else 'None'} with "
                       "pairs='exact'.")
    shifts, pair_indices, weights = _exact_pairs(group_size)
    pair_l1 = _shifted_pair_l1(_grouped_maps(x, num_groups), shifts)
  else:
    if pair_indices is None:
      if key is None:
        raise ValueError("pairs='sampled' needs a PRNG key (or pair_indices); "
                         'got key=None.')
      if num_pairs is None:
        num_pairs = 3 * group_size
      _check_positive_int(num_pairs, 'num_pairs')
      pair_indices = sample_pairs(key, group_size, num_pairs)
    else:
      if key is not None or num_pairs is not None:
        raise ValueError('pass either pair_indices or key/num_pairs, not both.')
      if jnp.ndim(pair_indices) != 2 or jnp.shape(pair_indices)[1] != 2 or (
          jnp.shape(pair_indices)[0] == 0):
        raise ValueError('pair_indices must have shape [r, 2] with r >= 1; got '
                         f'shape {tuple(jnp.shape(pair_indices))}.')
      if not jnp.issubdtype(jnp.result_type(pair_indices), jnp.integer):
        raise ValueError('pair_indices must be integers; got dtype '
                         f'{jnp.result_type(pair_indices)}.')
      if not isinstance(pair_indices, jax.core.Tracer):  # checkable values
        # Evaluated now even under jit (a NumPy constant is not traced).
        with jax.ensure_compile_time_eval():
          low, high = int(jnp.min(pair_indices)), int(jnp.max(pair_indices))
        if low < 0 or high >= group_size:
          raise ValueError(f'pair_indices must lie in [0, {group_size}) (filters per '
                           f'group); got values in [{low}, {high}].')
    pair_indices = jnp.asarray(pair_indices)
    weights = jnp.full(pair_indices.shape[0], 1.0 / pair_indices.shape[0])
    pair_l1 = _sampled_pair_l1(x, pair_indices, num_groups=num_groups)

  # Per-channel L1 of the whole ψ, then the grouped channels: summing the grouped
  # slice instead makes XLA copy it out of ψ first (one B·H·W·G·f write).
  filter_l1 = jnp.sum(jnp.abs(jnp.asarray(psi).astype(x.dtype)), axis=(1, 2))[
      :, :num_groups * group_size].reshape(batch, num_groups, group_size)  # [B, G, f]
  first_l1 = jnp.take(filter_l1, pair_indices[:, 0], axis=2)  # [B, G, P]
  second_l1 = jnp.take(filter_l1, pair_indices[:, 1], axis=2)
  if reduction == 'pooled':
    pair_l1, first_l1, second_l1 = _batch_sum(
        (pair_l1.sum(0), first_l1.sum(0), second_l1.sum(0)), axis_name)
    distance = _soft_jaccard_from_l1(pair_l1, first_l1, second_l1)  # [G, P]
  else:
    per_image = _soft_jaccard_from_l1(pair_l1, first_l1, second_l1)  # [B, G, P]
    total, count = _batch_sum(
        (per_image.sum(0), jnp.asarray(batch, per_image.dtype)), axis_name)
    distance = total / count
  return distance @ weights.astype(distance.dtype)


# ----------------------------------------------------------------------------
# Spatial concentration L_s.
# ----------------------------------------------------------------------------


def _spatial_concentration_maps(x: Array, eps: float) -> Array:
  """L_s of every map, ``[B, H, W, C]`` → ``[B, C]``, in jax.numpy (any platform, any order of AD)."""
  _, height, width, _ = x.shape
  rows = jnp.arange(height, dtype=x.dtype)[:, None, None]  # [H, 1, 1] vs [B, H, W, C]
  cols = jnp.arange(width, dtype=x.dtype)[None, :, None]
  mass = jnp.sum(x, axis=(1, 2)) + eps  # [B, C]
  # _safe_divide: an empty map is 0 (not NaN) even with eps = 0.
  centre_row = _safe_divide(jnp.sum(rows * x, axis=(1, 2)), mass)
  centre_col = _safe_divide(jnp.sum(cols * x, axis=(1, 2)), mass)
  distance = _safe_sqrt(
      jnp.square(rows - centre_row[:, None, None, :])
      + jnp.square(cols - centre_col[:, None, None, :]))
  return _safe_divide(jnp.sum(x * distance, axis=(1, 2)), mass)


def _cpu_kernel_spatial_concentration_maps(x: Array, eps: float) -> Array:
  """`_spatial_concentration_maps` as a C++ kernel (`cgl_jax.cpu_kernels`): CPU, reverse mode.

  XLA makes some eight passes over ψ for L_s's value and gradient, each a trip
  through memory on one core; the kernels make two (forward) and one (backward,
  which returns four coefficients per map; XLA forms the element-wise gradient in
  its consumer) per image and channel slice while it is in cache, on all
  intra-op threads.
  """
  return _cpu_kernel_module().spatial_concentration_maps(x, eps=eps)


def spatial_concentration(psi: Array, *, eps: float = 1e-4) -> Array:
  """Spatial concentration: mean distance of each mask's mass from its centre.

  For each image b and channel c, with positions j = (y, x) the integer
  feature-map coordinates:

      c   = Σ_j j·ψ_j / (Σ_j ψ_j + eps)
      L_s = Σ_j ψ_j·‖j − c‖₂ / (Σ_j ψ_j + eps)

  averaged over all B·C maps (every channel, free ones included). Paper and
  authors' code agree. ‖·‖₂ uses a safe square root (zero gradient at 0) and an
  empty map counts 0 (also with eps = 0), so single-pixel and all-zero maps are
  finite in value and gradient. Under a
  named batch axis, ``lax.pmean`` of the result is the global-batch value.

  On a single CPU device (float32/float64) value and gradient come from a C++
  kernel (`cgl_jax.cpu_kernels`; reverse mode only: set ``CGL_JAX_CPU_KERNEL=0``
  for forward-mode or higher-order derivatives there); elsewhere from
  jax.numpy. They agree to float rounding.

  Args:
    psi: ``[B, H, W, C]`` soft masks.
    eps: added to the mask mass (1e-4 as in the spec).

  Returns:
    A scalar in the compute dtype (>= float32).
  """
  _check_rank(psi, 'psi', 4, '[B, H, W, C]')
  x = jnp.asarray(psi).astype(_compute_dtype(psi))
  if _use_cpu_kernels(x):
    per_map = lax.platform_dependent(
        x, cpu=functools.partial(_cpu_kernel_spatial_concentration_maps, eps=eps),
        default=functools.partial(_spatial_concentration_maps, eps=eps))
  else:
    per_map = _spatial_concentration_maps(x, eps)
  return jnp.mean(per_map)


# ----------------------------------------------------------------------------
# Kernel terms: group sparsity R_bn, group relevance, orthogonality.
# ----------------------------------------------------------------------------


def _kernel_group_norms(kernel: Array, num_groups: int, p: float) -> Array:
  """Safe p-norm of each output-filter group of kernel[..., C_out] → [G]."""
  if jnp.ndim(kernel) < 2:
    raise ValueError('kernel must have rank >= 2 [..., C_in, C_out] (Flax conv: '
                     f'[kh, kw, C_in, C_out]); got shape {tuple(jnp.shape(kernel))}.')
  channels = kernel.shape[-1]
  group_size = _group_size(channels, num_groups, name='kernel', shape=kernel.shape)
  w = jnp.asarray(kernel).astype(_compute_dtype(kernel)).reshape(-1, channels)  # [fan_in, C_out]
  # Per output channel first (a reduction over the leading axis, in the kernel's
  # own layout), then over each group's f channels. Reducing [fan_in, G, f] over
  # axes (0, 2) in one go had XLA's GPU backend build transposing fusions around
  # the kernels; with this order R_bn alone costs 1.00× the ShapesCNN CE step on
  # an H200, against 1.05× before (AlexNet: 1.03× against 1.04×).
  per_channel = _norm_accumulate(_norm_powers(w, p), p, axis=0)  # [C_out]
  grouped = per_channel[:num_groups * group_size].reshape(num_groups, group_size)
  return _norm_root(_norm_accumulate(grouped, p, axis=1), p)


def block_norm(kernel: Array, num_groups: int, *, p: float = 2,
               q: float = 1) -> Array:
  """Group-sparsity block norm ℓ_{p,q} over groups of output filters (R_bn).

      R = ‖ (‖W_1‖_p, …, ‖W_G‖_p) ‖_q,   W_g = W[..., g·f:(g+1)·f]

  with ‖W_g‖_p the entry-wise p-norm of the group's filters (p = 2: Frobenius)
  and free filters (the last C_out − G·f) excluded. The default p = 2, q = 1 is
  the paper's and code's ℓ_{2,1}: R = Σ_g ‖W_g‖_F. Safe at zero: a dead group
  contributes 0 with zero (not NaN) gradient.

  Args:
    kernel: ``[kh, kw, C_in, C_out]`` (any ``[..., C_out]``).
    num_groups: G, 1 <= G <= C_out.
    p: inner norm order, >= 1 or inf.
    q: outer norm order, >= 1 or inf.

  Returns:
    A scalar in the compute dtype (>= float32).
  """
  _check_norm_order(p, 'p')
  _check_norm_order(q, 'q')
  return _vector_norm(_kernel_group_norms(kernel, num_groups, p), q, axis=0)


def group_relevance(kernel: Array, num_groups: int) -> Array:
  """Group relevance β_gl = ‖W_g‖_F of each filter group (free filters excluded).

  The paper's concept-group plot uses β_gl and β_l = Σ_g β_gl (=
  ``block_norm(kernel, num_groups)``).

  Args:
    kernel: ``[kh, kw, C_in, C_out]`` (any ``[..., C_out]``).
    num_groups: G, 1 <= G <= C_out.

  Returns:
    ``[G]`` in the compute dtype (>= float32).
  """
  return _kernel_group_norms(kernel, num_groups, 2)


def orthogonality(kernel: Array) -> Array:
  """Soft orthogonality ‖W Wᵀ − I‖_F (authors' code only; off by default).

  W is the kernel reshaped to ``[C_out, kh·kw·C_in]``, so the term pushes the
  output filters towards an orthonormal set. Safe square root at 0.

  Args:
    kernel: ``[kh, kw, C_in, C_out]`` (any ``[..., C_out]``).

  Returns:
    A scalar in the compute dtype (>= float32).
  """
  if jnp.ndim(kernel) < 2:
    raise ValueError('kernel must have rank >= 2 [..., C_in, C_out] (Flax conv: '
                     f'[kh, kw, C_in, C_out]); got shape {tuple(jnp.shape(kernel))}.')
  dtype = _compute_dtype(kernel)
  w = jnp.asarray(kernel).astype(dtype).reshape(-1, kernel.shape[-1]).T
  gram = jnp.matmul(w, w.T, precision=lax.Precision.HIGHEST)
  return _safe_sqrt(jnp.sum(jnp.square(gram - jnp.eye(w.shape[0], dtype=dtype))))
