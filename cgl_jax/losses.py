"""Concept Group Learning regularizers as pure JAX functions.

Varshneya et al., "Learning Interpretable Concept Groups in CNNs", IJCAI 2021. Where the
paper and the authors' PyTorch code (srb-cv/cgl) differ, the docstring says which one a
function follows. Conventions:
  * Activations are NHWC ``[B, H, W, C]``; conv kernels are Flax's ``[kh, kw, C_in, C_out]``.
  * A layer with C channels and G groups has ``f = C // G`` filters per group; group g
    holds channels ``[g·f, (g+1)·f)``; the ``C − G·f`` free channels join no group term.
  * Computation runs in at least float32 (bfloat16/float16 inputs are promoted, float64
    stays float64), and the results have that dtype.
  * Norms and divisions are guarded: values and gradients stay finite at zero.
  * ``axis_name``: under ``pmap``/``shard_map``/``vmap`` with a named batch axis, batch
    statistics are summed over it (``lax.psum``): every device gets the global value.

It imports jax only and can be copied on its own. Faster inner pieces plug in through
``group_coherence(..., pair_sums=)`` and ``spatial_concentration(..., per_map=)``.
"""
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
AxisName = Any  # a hashable mesh / pmap axis name, or a tuple of them
Axis = Union[int, Sequence[int]]
PairSums = Callable[..., Array]  # (x [B, HW, C], pair_indices [r, 2], *, num_groups) -> [B, G, r]
PerMap = Callable[[Array, float], Array]  # (psi [B, H, W, C], eps) -> [B, C]

PAIRS = ('exact', 'sampled')
REDUCTIONS = ('per_sample', 'pooled')


def _compute_dtype(x: Array) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(x), jnp.float32)  # at least float32


def _check_rank(x: Array, name: str, rank: int, layout: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f'{name} must have rank {rank} {layout}; got shape {tuple(jnp.shape(x))}.')


def _check_positive_int(value: Any, name: str, context: str = '') -> None:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'{name} must be a positive integer; got {value!r}{context}.')


def _group_size(num_channels: int, num_groups: int, *, name: str, shape: Sequence[int]) -> int:
  """f = C // G after checking 0 < G <= C."""
  _check_positive_int(num_groups, 'num_groups', f' ({name} shape {tuple(shape)})')
  if num_groups > num_channels:
    raise ValueError(f'num_groups={num_groups} exceeds the {num_channels} channels of {name} '
                     f'with shape {tuple(shape)}.')
  return num_channels // num_groups


def _safe_sqrt(x: Array) -> Array:
  """sqrt(x) for x >= 0 with gradient 0 (not inf) at x = 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, and 0 (zero gradient) where denominator == 0."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def _norm_powers(x: Array, order: float) -> Array:
  """|x|^order element-wise (|x| for inf): the terms a norm accumulates."""
  if order == 2:
    return jnp.square(x)
  return jnp.abs(x) if order in (1, float('inf')) else jnp.abs(x)**order


def _norm_accumulate(terms: Array, order: float, axis: Axis) -> Array:
  """Sums (max for inf) the `_norm_powers` terms over ``axis``."""
  return jnp.max(terms, axis=axis) if order == float('inf') else jnp.sum(terms, axis=axis)


def _norm_root(total: Array, order: float) -> Array:
  """total^(1/order) with zero (not NaN/inf) gradient at total = 0."""
  if order in (1, float('inf')):
    return total
  if order == 2:
    return _safe_sqrt(total)
  positive = total > 0
  return jnp.where(positive, jnp.where(positive, total, 1)**(1.0 / order), 0)


def _batch_sum(x: Any, axis_name: Optional[AxisName]) -> Any:
  return x if axis_name is None else lax.psum(x, axis_name)


def _soft_jaccard_from_l1(diff: Array, norm_p: Array, norm_q: Array) -> Array:
  """D = 2·‖p−q‖₁ / (‖p‖₁ + ‖q‖₁ + ‖p−q‖₁) from the three L1 norms (0 when all are 0)."""
  return _safe_divide(2 * diff, norm_p + norm_q + diff)


def soft_masks(preact: Array, *, scale: Union[float, Array] = 1.0,
               shift: Union[float, Array] = 0.0, eps: float = 5e-3,
               axis_name: Optional[AxisName] = None) -> Array:
  """Soft masks ψ = sigmoid(scale · a / (S_c + eps) + shift) of pre-activations a.

  S_c is the standard deviation (ddof = 1, not stopped from the gradient) of channel c over
  the batch and both spatial axes, over the global batch under ``axis_name``. Paper and
  authors' code agree; ``scale``, ``shift`` are the paper's P1, P2 (1 and 0 in the code).

  Args:
    preact: ``[B, H, W, C]`` conv output before the non-linearity.
    scale, shift: P1, P2 (Python numbers or scalar arrays, e.g. learned).
    eps: added to S_c (5e-3 as in the authors' code).
    axis_name: named batch axis.

  Returns:
    ψ in (0, 1), ``[B, H, W, C]``, in the compute dtype.
  """
  _check_rank(preact, 'preact', 4, '[B, H, W, C]')
  x = jnp.asarray(preact).astype(_compute_dtype(preact))
  local_count = x.shape[0] * x.shape[1] * x.shape[2]
  if axis_name is None and local_count < 2:
    raise ValueError('soft_masks needs at least 2 values per channel for the ddof=1 standard '
                     f'deviation; preact has shape {x.shape}.')
  total, count = _batch_sum((jnp.sum(x, axis=(0, 1, 2)), jnp.asarray(local_count, x.dtype)),
                            axis_name)
  mean = total / count  # two passes (mean, then deviations): accurate with large means
  squared_deviation = _batch_sum(jnp.sum(jnp.square(x - mean), axis=(0, 1, 2)), axis_name)
  std = _safe_sqrt(squared_deviation / (count - 1))
  return jax.nn.sigmoid(scale * x / (std + eps) + shift)


def soft_masks_bn(bn_out: Array, gamma: Array, *, scale: Union[float, Array] = 1.0,
                  shift: Union[float, Array] = 0.0, eps: float = 1e-3) -> Array:
  """Soft masks ψ = sigmoid(scale · y / γ̃_c + shift) of a batch-norm output y ("Alexnet-B").

  γ̃ = sign(γ) · max(|γ|, eps) with γ the BN scale (sign(0) counts as +), so y / γ is the
  paper's τ. The authors' code divides by the BN running variance: pass it as ``gamma``.

  Args:
    bn_out: ``[B, H, W, C]`` batch-norm output (before the non-linearity).
    gamma: ``[C]`` BN scale (or running variance).
    scale, shift: P1, P2.
    eps: lower bound on |γ|.

  Returns:
    ψ in (0, 1), ``[B, H, W, C]``, in the compute dtype.
  """
  _check_rank(bn_out, 'bn_out', 4, '[B, H, W, C]')
  if jnp.shape(gamma) != (bn_out.shape[-1],):
    raise ValueError(f'gamma must have shape [C] = ({bn_out.shape[-1]},) to match bn_out with '
                     f'shape {tuple(bn_out.shape)}; got shape {tuple(jnp.shape(gamma))}.')
  dtype = jnp.promote_types(_compute_dtype(bn_out), _compute_dtype(gamma))
  y, gamma = jnp.asarray(bn_out).astype(dtype), jnp.asarray(gamma).astype(dtype)
  guarded = jnp.where(jnp.abs(gamma) < eps, jnp.where(gamma < 0, -eps, eps), gamma)
  return jax.nn.sigmoid(scale * y / guarded + shift)


def soft_jaccard_distance(p: Array, q: Array, *, axis: Axis) -> Array:
  """D(p, q) = 2·‖p − q‖₁ / (‖p‖₁ + ‖q‖₁ + ‖p − q‖₁), a soft 1 − IoU (paper and code).

  Norms over ``axis``. For binary masks D = 1 − |p ∩ q| / |p ∪ q|; two all-zero masks have
  D = 0 with zero gradient. Returns D in [0, 1] (non-negative inputs), ``axis`` reduced.
  """
  dtype = jnp.promote_types(_compute_dtype(p), _compute_dtype(q))
  p, q = jnp.asarray(p).astype(dtype), jnp.asarray(q).astype(dtype)
  return _soft_jaccard_from_l1(jnp.sum(jnp.abs(p - q), axis=axis),
                               jnp.sum(jnp.abs(p), axis=axis), jnp.sum(jnp.abs(q), axis=axis))


def sample_pairs(key: Array, num_filters: int, num_pairs: int) -> Array:
  """``num_pairs`` ordered filter pairs (i, j), i ≠ j, uniform with replacement: int32 ``[r, 2]``.

  i is uniform on ``[0, f)``, j = (i + 1 + u) mod f with u uniform on ``[0, f − 1)``: each
  of the f·(f−1) ordered pairs has probability 1 / (f·(f−1)).
  """
  _check_positive_int(num_pairs, 'num_pairs')
  _check_positive_int(num_filters, 'num_filters')
  if num_filters < 2:
    raise ValueError(f'num_filters must be >= 2 to form pairs i != j; got {num_filters}.')
  first_key, offset_key = jax.random.split(key)
  first = jax.random.randint(first_key, (num_pairs,), 0, num_filters)
  offset = jax.random.randint(offset_key, (num_pairs,), 1, num_filters)
  return jnp.stack([first, (first + offset) % num_filters], axis=1).astype(jnp.int32)


def _grouped_maps(x: Array, num_groups: int) -> Array:
  """ψ as ``[B, HW, C]`` → its grouped filters ``[B, HW, G, f]`` (free channels dropped)."""
  batch, positions, channels = x.shape
  group_size = channels // num_groups
  return x[..., :num_groups * group_size].reshape(batch, positions, num_groups, group_size)


def pair_l1_sums(x: Array, pair_indices: Array, *, num_groups: int) -> Array:
  """Σ_hw |x[b, hw, g·f + i] − x[b, hw, g·f + j]| per pair (i, j): ``[B, HW, C]`` → ``[B, G, r]``.

  The default ``pair_sums`` of `group_coherence`: a gather of both filters of every pair
  (one transient ``[B, HW, G, r]`` array), differentiable in any mode. Indices are read
  as jax indexing reads them (negative ones count from the end, then clamped to [0, f)).
  """
  maps = _grouped_maps(x, num_groups)
  return jnp.sum(jnp.abs(maps[..., pair_indices[:, 0]] - maps[..., pair_indices[:, 1]]), axis=1)


def _exact_pairs(num_filters: int) -> tuple[Array, Array, Array]:
  """Shifts k = 1 … ⌊f/2⌋, pairs (i, i+k mod f) k-major ``[K·f, 2]``, weights ``[K·f]`` (sum 1).

  D is symmetric: shift k also stands for f − k (weight 2), except k = f/2 (weight 1).
  """
  shifts = jnp.arange(1, num_filters // 2 + 1, dtype=jnp.int32)
  weight_per_shift = jnp.where(2 * shifts == num_filters, 1.0, 2.0) / (
      num_filters * (num_filters - 1))
  first = jnp.tile(jnp.arange(num_filters, dtype=jnp.int32), shifts.shape[0])
  second = (first + jnp.repeat(shifts, num_filters)) % num_filters
  return shifts, jnp.stack([first, second], axis=1), jnp.repeat(weight_per_shift, num_filters)


def _shifted_pair_l1(maps: Array, shifts: Array) -> Array:
  """Σ_hw |maps[..., i] − maps[..., (i + k) mod f]| for every i and shift k: ``[B, HW, G, f]`` →
  ``[B, G, K·f]`` (index k_index·f + i), a ``lax.scan`` of rematerialised steps: the forward
  and backward passes hold about three arrays of the size of ``maps``, never f².
  """
  maps = maps.transpose(0, 2, 3, 1)  # [B, G, f, HW]: each filter's map contiguous
  filters = jnp.arange(maps.shape[2])

  @jax.checkpoint
  def l1_to_shifted(shift):
    # A gather (not jnp.roll): its transpose accumulates into one buffer.
    shifted = jnp.take(maps, (filters + shift) % maps.shape[2], axis=2)
    return jnp.sum(jnp.abs(maps - shifted), axis=-1)  # [B, G, f]

  _, per_shift = lax.scan(lambda carry, k: (carry, l1_to_shifted(k)), None, shifts)
  return jnp.moveaxis(per_shift, 0, 2).reshape(maps.shape[0], maps.shape[1], -1)


def _check_pair_indices(pair_indices: Array, group_size: int) -> None:
  if jnp.ndim(pair_indices) != 2 or jnp.shape(pair_indices)[1] != 2 or (
      jnp.shape(pair_indices)[0] == 0):
    raise ValueError('pair_indices must have shape [r, 2] with r >= 1; got shape '
                     f'{tuple(jnp.shape(pair_indices))}.')
  if not jnp.issubdtype(jnp.result_type(pair_indices), jnp.integer):
    raise ValueError(f'pair_indices must be integers; got dtype {jnp.result_type(pair_indices)}.')
  if not isinstance(pair_indices, jax.core.Tracer):  # concrete values (even under jit)
    with jax.ensure_compile_time_eval():
      low, high = int(jnp.min(pair_indices)), int(jnp.max(pair_indices))
    if low < 0 or high >= group_size:
      raise ValueError(f'pair_indices must lie in [0, {group_size}) (filters per group); got '
                       f'values in [{low}, {high}].')


def group_coherence(psi: Array, num_groups: int, *, pairs: str = 'exact',
                    key: Optional[Array] = None, num_pairs: Optional[int] = None,
                    pair_indices: Optional[Array] = None, reduction: str = 'per_sample',
                    axis_name: Optional[AxisName] = None,
                    pair_sums: Optional[PairSums] = None) -> Array:
  """Group coherence: mean soft Jaccard distance D between the filters of each group.

  For group g (channels ``[g·f, (g+1)·f)``) and ordered pairs (i, j), i ≠ j, of its filters:

      per_sample: value_g = mean_pairs mean_b D(ψ_b[..., g·f+i], ψ_b[..., g·f+j])
                  (norms over H×W per image: the authors' code; default)
      pooled:     value_g = mean_pairs D(ψ[..., g·f+i], ψ[..., g·f+j])
                  (norms over B×H×W: the paper's text)

  The layer's L_g is ``value.sum()`` (the network's: the mean over layers).

  Pairs: 'sampled' (paper and code) uses ``num_pairs`` (default 3·f) pairs drawn from
  ``key`` by `sample_pairs`, the same for every group as in the authors' code, or the
  explicit ``pair_indices``. 'exact' (ours) averages over all f·(f−1) ordered pairs with a
  scan over the ⌊f/2⌋ filter shifts, in memory linear in ψ; it is the expectation of
  'sampled' over keys.

  Args:
    psi: ``[B, H, W, C]`` soft masks (e.g. from `soft_masks`).
    num_groups: G, with f = C // G >= 2.
    pairs: 'exact' or 'sampled'.
    key: PRNG key for 'sampled'.
    num_pairs: r for 'sampled' (default 3·f).
    pair_indices: int ``[r, 2]`` in-group filter indices in ``[0, f)`` for 'sampled',
      instead of ``key``/``num_pairs`` (range checked when not traced).
    reduction: 'per_sample' or 'pooled'.
    axis_name: named batch axis: means and sums then cover the global batch.
    pair_sums: for 'sampled', a function ``(x, pair_indices, *, num_groups) -> [B, G, r]``
      with x = ψ reshaped to ``[B, H·W, C]`` in the compute dtype (free channels included)
      returning Σ_hw |x[b, hw, g·f + i] − x[b, hw, g·f + j]|, differentiable in x (at
      least in reverse mode). None: `pair_l1_sums`.

  Returns:
    ``[G]`` per-group values in [0, 1], in the compute dtype.
  """
  _check_rank(psi, 'psi', 4, '[B, H, W, C]')
  batch, height, width, channels = psi.shape
  group_size = _group_size(channels, num_groups, name='psi', shape=psi.shape)
  if group_size < 2:
    raise ValueError(f'group_coherence needs >= 2 filters per group; psi with shape '
                     f'{tuple(psi.shape)} and num_groups={num_groups} gives {group_size}.')
  if reduction not in REDUCTIONS:
    raise ValueError(f'reduction must be one of {REDUCTIONS}; got {reduction!r}.')
  if pairs not in PAIRS:
    raise ValueError(f'pairs must be one of {PAIRS}; got {pairs!r}.')
  x = jnp.asarray(psi).astype(_compute_dtype(psi)).reshape(batch, height * width, channels)

  if pairs == 'exact':
    if num_pairs is not None or pair_indices is not None or pair_sums is not None:
      raise ValueError("num_pairs, pair_indices and pair_sums apply to pairs='sampled' only; "
                       f"got num_pairs={num_pairs!r}, pair_indices "
                       f"{'given' if pair_indices is not None else 'None'}, pair_sums "
                       f"{'given' if pair_sums is not None else 'None'} with pairs='exact'.")
    shifts, pair_indices, weights = _exact_pairs(group_size)
    pair_l1 = _shifted_pair_l1(_grouped_maps(x, num_groups), shifts)
  else:
    if pair_indices is None:
      if key is None:
        raise ValueError("pairs='sampled' needs a PRNG key (or pair_indices); got key=None.")
      num_pairs = 3 * group_size if num_pairs is None else num_pairs
      _check_positive_int(num_pairs, 'num_pairs')
      pair_indices = sample_pairs(key, group_size, num_pairs)
    elif key is not None or num_pairs is not None:
      raise ValueError('pass either pair_indices or key/num_pairs, not both.')
    else:
      _check_pair_indices(pair_indices, group_size)
    pair_indices = jnp.asarray(pair_indices)
    weights = jnp.full(pair_indices.shape[0], 1.0 / pair_indices.shape[0])
    pair_l1 = (pair_sums or pair_l1_sums)(x, pair_indices, num_groups=num_groups)

  # Per-channel L1 of all of ψ, then the grouped channels (summing the grouped slice
  # makes XLA copy it out of ψ first).
  filter_l1 = jnp.sum(jnp.abs(x), axis=1)[:, :num_groups * group_size].reshape(
      batch, num_groups, group_size)  # [B, G, f]
  first_l1 = jnp.take(filter_l1, pair_indices[:, 0], axis=2)  # [B, G, r]
  second_l1 = jnp.take(filter_l1, pair_indices[:, 1], axis=2)
  if reduction == 'pooled':
    pair_l1, first_l1, second_l1 = _batch_sum(
        (pair_l1.sum(0), first_l1.sum(0), second_l1.sum(0)), axis_name)
    distance = _soft_jaccard_from_l1(pair_l1, first_l1, second_l1)  # [G, r]
  else:
    per_image = _soft_jaccard_from_l1(pair_l1, first_l1, second_l1)  # [B, G, r]
    total, count = _batch_sum((per_image.sum(0), jnp.asarray(batch, per_image.dtype)), axis_name)
    distance = total / count
  return distance @ weights.astype(distance.dtype)


def spatial_concentration_maps(psi: Array, eps: float = 1e-4) -> Array:
  """L_s of every map, ``[B, H, W, C]`` → ``[B, C]`` (see `spatial_concentration`); any AD mode."""
  _, height, width, _ = psi.shape
  rows = jnp.arange(height, dtype=psi.dtype)[:, None, None]  # [H, 1, 1] against [B, H, W, C]
  cols = jnp.arange(width, dtype=psi.dtype)[None, :, None]
  mass = jnp.sum(psi, axis=(1, 2)) + eps  # [B, C]
  centre_row = _safe_divide(jnp.sum(rows * psi, axis=(1, 2)), mass)  # 0 for an empty map
  centre_col = _safe_divide(jnp.sum(cols * psi, axis=(1, 2)), mass)
  distance = _safe_sqrt(jnp.square(rows - centre_row[:, None, None, :])
                        + jnp.square(cols - centre_col[:, None, None, :]))
  return _safe_divide(jnp.sum(psi * distance, axis=(1, 2)), mass)


def spatial_concentration(psi: Array, *, eps: float = 1e-4,
                          per_map: Optional[PerMap] = None) -> Array:
  """Spatial concentration L_s: mean distance of each mask's mass from its centre.

  For each image b and channel c, with j = (y, x) the integer feature-map positions:

      c   = Σ_j j·ψ_j / (Σ_j ψ_j + eps)
      L_s = Σ_j ψ_j·‖j − c‖₂ / (Σ_j ψ_j + eps)

  averaged over all B·C maps (free channels included). Paper and authors' code agree. The
  square root is safe at 0 and an empty map counts 0 (also with eps = 0). Under a named
  batch axis, ``lax.pmean`` of the result is the global-batch value.

  Args:
    psi: ``[B, H, W, C]`` soft masks.
    eps: added to the mask mass.
    per_map: a function ``(psi, eps) -> [B, C]`` computing the per-map L_s of ψ in the
      compute dtype, differentiable in ψ (at least in reverse mode). None:
      `spatial_concentration_maps`.

  Returns:
    A scalar in the compute dtype.
  """
  _check_rank(psi, 'psi', 4, '[B, H, W, C]')
  x = jnp.asarray(psi).astype(_compute_dtype(psi))
  return jnp.mean((per_map or spatial_concentration_maps)(x, eps))


def _kernel_group_norms(kernel: Array, num_groups: int, p: float) -> Array:
  """Safe p-norm of each output-filter group of kernel[..., C_out] → [G]."""
  if jnp.ndim(kernel) < 2:
    raise ValueError('kernel must have rank >= 2 [..., C_in, C_out] (Flax conv: '
                     f'[kh, kw, C_in, C_out]); got shape {tuple(jnp.shape(kernel))}.')
  channels = kernel.shape[-1]
  group_size = _group_size(channels, num_groups, name='kernel', shape=kernel.shape)
  w = jnp.asarray(kernel).astype(_compute_dtype(kernel)).reshape(-1, channels)
  # Per output channel first (over the kernel's leading axis, in its own layout), then
  # over each group: one reduction over [fan_in, G, f] makes GPU backends transpose.
  per_channel = _norm_accumulate(_norm_powers(w, p), p, axis=0)  # [C_out]
  grouped = per_channel[:num_groups * group_size].reshape(num_groups, group_size)
  return _norm_root(_norm_accumulate(grouped, p, axis=1), p)


def block_norm(kernel: Array, num_groups: int, *, p: float = 2, q: float = 1) -> Array:
  """Group-sparsity block norm R = ‖(‖W_1‖_p, …, ‖W_G‖_p)‖_q over output-filter groups (R_bn).

  W_g = W[..., g·f:(g+1)·f] with entry-wise p-norms, free filters excluded. The default
  p = 2, q = 1 is the paper's and code's ℓ_{2,1}: R = Σ_g ‖W_g‖_F. A dead group
  contributes 0 with zero (not NaN) gradient.

  Args:
    kernel: ``[kh, kw, C_in, C_out]`` (any ``[..., C_out]``).
    num_groups: G, 1 <= G <= C_out.
    p, q: inner and outer norm orders, >= 1 or inf.

  Returns:
    A scalar in the compute dtype.
  """
  for name, value in (('p', p), ('q', q)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 1:
      raise ValueError(f'{name} must be a real number >= 1 (or inf); got {value!r}.')
  group_norms = _kernel_group_norms(kernel, num_groups, p)
  return _norm_root(_norm_accumulate(_norm_powers(group_norms, q), q, 0), q)


def group_relevance(kernel: Array, num_groups: int) -> Array:
  """β_gl = ‖W_g‖_F of each filter group, ``[G]`` (free filters excluded); Σ_g β_gl = R_bn."""
  return _kernel_group_norms(kernel, num_groups, 2)


def orthogonality(kernel: Array) -> Array:
  """Soft orthogonality ‖W Wᵀ − I‖_F, W = kernel as ``[C_out, kh·kw·C_in]`` (authors' code only).

  Pushes the output filters towards an orthonormal set; safe square root at 0. Returns a
  scalar in the compute dtype.
  """
  if jnp.ndim(kernel) < 2:
    raise ValueError('kernel must have rank >= 2 [..., C_in, C_out] (Flax conv: '
                     f'[kh, kw, C_in, C_out]); got shape {tuple(jnp.shape(kernel))}.')
  dtype = _compute_dtype(kernel)
  w = jnp.asarray(kernel).astype(dtype).reshape(-1, kernel.shape[-1]).T
  gram = jnp.matmul(w, w.T, precision=lax.Precision.HIGHEST)
  return _safe_sqrt(jnp.sum(jnp.square(gram - jnp.eye(w.shape[0], dtype=dtype))))
