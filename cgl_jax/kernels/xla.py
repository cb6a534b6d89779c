"""L_g's sampled pair sums in XLA with hand-written backward passes: a loop and two matmuls.

Both satisfy the ``pair_sums`` contract of `cgl_jax.losses.group_coherence`:

    pair_sums(x [B, HW, C], pair_indices [r, 2], *, num_groups) -> [B, G, r]
    out[b, g, k] = Σ_hw |x[b, hw, g·f + i_k] − x[b, hw, g·f + j_k]|,   f = C // G

and are differentiable in reverse mode only (custom VJPs that recompute the signs from
the maps instead of keeping an ``[B, HW, G, r]`` tensor of differences).

  `loop_pair_l1`    a ``fori_loop`` over the pairs on a filter-major copy of the maps,
                    and one over the pairs' filter-sorted incidences backward: no
                    per-pair intermediate. Suits CPUs, where XLA runs such loops well.
  `matmul_pair_l1`  two matmuls with the ±1 pair-incidence matrix each way: four
                    kernels on accelerators, where a loop is bound by the latency of
                    its iterations, and one transient ``[B, HW, G, r]`` tensor.
"""
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array


def grouped_maps(x: Array, num_groups: int) -> Array:
  """ψ as ``[B, HW, C]`` → its grouped filters ``[B, HW, G, f]`` (free channels dropped)."""
  batch, positions, channels = x.shape
  group_size = channels // num_groups
  return x[..., :num_groups * group_size].reshape(batch, positions, num_groups, group_size)


def pair_incidences(pair_indices: Array, num_filters: int):
  """The pairs as a filter-sorted incidence list, for backward passes that visit filters in turn.

  Pair k = (i, j) gives two incidences, (owner i, other j, pair k) and (owner j, other i,
  pair k), sorted by owner with a stable sort: within a filter, the pairs where it is
  first, then those where it is second, each in pair order.

  Args:
    pair_indices: int ``[r, 2]`` pairs (i, j) of filter indices in ``[0, f)``.
    num_filters: f.

  Returns:
    ``(starts, owner, other, pair)``: int32 ``[f + 1]`` where filter f's incidences are
    ``starts[f]:starts[f + 1]``, and int32 ``[2r]`` owner filter, other filter and pair
    index of each incidence.
  """
  num_pairs = pair_indices.shape[0]
  pair_indices = jnp.asarray(pair_indices).astype(jnp.int32)
  owner = jnp.concatenate([pair_indices[:, 0], pair_indices[:, 1]])
  other = jnp.concatenate([pair_indices[:, 1], pair_indices[:, 0]])
  pair = jnp.concatenate([jnp.arange(num_pairs, dtype=jnp.int32)] * 2)
  order = jnp.argsort(owner, stable=True)
  # Counts by comparison (one small fusion) rather than jnp.searchsorted's while loop.
  counts = jnp.sum(owner[:, None] == jnp.arange(num_filters, dtype=jnp.int32), axis=0)
  starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
  return starts, owner[order], other[order], pair[order]


def identity_outside_ynnpack(x: Array) -> Array:
  """x unchanged (rounded to its own dtype's precision), as an op XLA:CPU keeps off YNNPACK.

  XLA:CPU hands an element-wise-and-reduce fusion to YNNPACK, which cannot read a dynamic
  slice, so the two filter rows of a pair would first be copied out and then reduced. With
  this op inside, XLA fuses the slices, the difference and the sum into one pass. Where
  there is no YNNPACK (or XLA folds the no-op away) it changes nothing.
  """
  info = jnp.finfo(x.dtype)
  return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _zeros_varying_like(x: Array, shape) -> Array:
  """Zeros of x's dtype and the given shape, as device-varying as x.

  A loop carry inside ``shard_map`` must vary over the same mesh axes in and out;
  ``jnp.zeros`` does not, a select on x does (and stays exactly 0 where x is NaN).
  """
  return jnp.broadcast_to(jnp.where(False, x.reshape(-1)[0], jnp.zeros((), x.dtype)), shape)


@jax.custom_vjp
def _filter_major_pair_l1(maps: Array, pair_indices: Array) -> Array:
  """Σ_n |maps[..., i, n] − maps[..., j, n]| per pair (i, j): ``[..., f, N]`` → ``[r, ...]``."""
  filter_axis = maps.ndim - 2

  def pair_step(k, out):
    first = lax.dynamic_index_in_dim(maps, pair_indices[k, 0], filter_axis, keepdims=False)
    second = lax.dynamic_index_in_dim(maps, pair_indices[k, 1], filter_axis, keepdims=False)
    distance = identity_outside_ynnpack(jnp.abs(first - second))
    return lax.dynamic_update_index_in_dim(out, jnp.sum(distance, axis=-1), k, 0)

  num_pairs = pair_indices.shape[0]
  return lax.fori_loop(0, num_pairs, pair_step,
                       _zeros_varying_like(maps, (num_pairs, *maps.shape[:-2])))


def _filter_major_pair_l1_fwd(maps, pair_indices):
  return _filter_major_pair_l1(maps, pair_indices), (maps, pair_indices)


def _filter_major_pair_l1_bwd(residuals, cotangent):
  """∂/∂maps[f] = Σ over f's incidences (f, o, k) of c_k·sign(maps[f] − maps[o]).

  sign(0) = 0 as for ``jnp.abs``'s derivative. One loop step per incidence, in filter
  order (`pair_incidences`): consecutive steps add into the same gradient row and read
  the same own row, which stay in cache, so each step streams only the other filter's
  row; the summation order per filter is fixed, so results are deterministic.
  """
  maps, pair_indices = residuals
  filter_axis = maps.ndim - 2
  _, owner, other, pair = pair_incidences(pair_indices, maps.shape[filter_axis])

  def incidence_step(m, grad):
    own = lax.dynamic_index_in_dim(maps, owner[m], filter_axis, keepdims=False)
    partner = lax.dynamic_index_in_dim(maps, other[m], filter_axis, keepdims=False)
    slope = cotangent[pair[m]][..., None] * jnp.sign(own - partner)
    return grad.at[(slice(None),) * filter_axis + (owner[m],)].add(slope)

  grad = lax.fori_loop(0, owner.shape[0], incidence_step, _zeros_varying_like(maps, maps.shape))
  return grad, None


_filter_major_pair_l1.defvjp(_filter_major_pair_l1_fwd, _filter_major_pair_l1_bwd)


def loop_pair_l1(x: Array, pair_indices: Array, *, num_groups: int) -> Array:
  """The pair sums (module docstring) as loops over pairs and incidences: [B, HW, C] → [B, G, r].

  The maps are first made filter-major, ``[B, G, f, HW]`` (one batched 2-D transpose of
  each image's ``[HW, C]``, which XLA fuses into the producer of ψ), so each filter's map
  is one contiguous row.
  """
  maps = grouped_maps(x, num_groups)
  batch, positions, groups, group_size = maps.shape
  rows = maps.reshape(batch, positions, groups * group_size).transpose(0, 2, 1).reshape(
      batch, groups, group_size, positions)
  return jnp.moveaxis(_filter_major_pair_l1(rows, pair_indices), 0, -1)


def _pair_incidence_matrix(pair_indices: Array, num_filters: int, dtype) -> Array:
  """E = one_hot(i) − one_hot(j) per pair (i, j): ``[r, 2]`` → ``[r, f]``, entries 0, ±1."""
  return (jax.nn.one_hot(pair_indices[:, 0], num_filters, dtype=dtype)
          - jax.nn.one_hot(pair_indices[:, 1], num_filters, dtype=dtype))


def _pair_differences(maps: Array, incidence: Array) -> Array:
  """maps[..., i] − maps[..., j] per pair, ``[B, HW, G, f]`` → ``[B, HW, G, r]``.

  At full float32 precision (no TF32 or one-pass bf16): each entry is the exactly rounded
  difference.
  """
  return jnp.einsum('bngf,rf->bngr', maps, incidence, precision=lax.Precision.HIGHEST)


@jax.custom_vjp
def _grouped_matmul_pair_l1(maps: Array, pair_indices: Array) -> Array:
  incidence = _pair_incidence_matrix(pair_indices, maps.shape[-1], maps.dtype)
  return jnp.sum(jnp.abs(_pair_differences(maps, incidence)), axis=1)


def _grouped_matmul_pair_l1_fwd(maps, pair_indices):
  return _grouped_matmul_pair_l1(maps, pair_indices), (maps, pair_indices)


def _grouped_matmul_pair_l1_bwd(residuals, cotangent):
  """grad = (c·sign(differences)) @ E: one deterministic matmul instead of scatter-adds."""
  maps, pair_indices = residuals
  incidence = _pair_incidence_matrix(pair_indices, maps.shape[-1], maps.dtype)
  slope = cotangent[:, None] * jnp.sign(_pair_differences(maps, incidence))  # [B, HW, G, r]
  grad = jnp.einsum('bngr,rf->bngf', slope, incidence, precision=lax.Precision.HIGHEST)
  return grad, None


_grouped_matmul_pair_l1.defvjp(_grouped_matmul_pair_l1_fwd, _grouped_matmul_pair_l1_bwd)


def matmul_pair_l1(x: Array, pair_indices: Array, *, num_groups: int) -> Array:
  """The pair sums (module docstring) as matmuls with the ±1 incidence matrix E: → [B, G, r].

  Forward: the differences of all r pairs in the native layout (no transpose), their
  absolute values summed over HW. Backward: the same differences recomputed,
  ``slope = c·sign(diff)`` and ``grad = slope @ E``.
  """
  return _grouped_matmul_pair_l1(grouped_maps(x, num_groups), pair_indices)
