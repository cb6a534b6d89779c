"""L_g's sampled pair sums as two Pallas (Triton) GPU kernels, forward and backward.

    pair_l1[b, g, k] = Σ_hw |maps[b, hw, g, i_k] − maps[b, hw, g, j_k]|

for r pairs (i_k, j_k) of the f filters of each of the G groups: `pair_l1` satisfies the
``pair_sums`` contract of `cgl_jax.losses.group_coherence` (float32, CUDA; any backend
with ``interpret=True``).

Why kernels: the matmul form (`cgl_jax.kernels.xla.matmul_pair_l1`) writes and reads an
``[B, HW, G, r]`` tensor of differences (r = 3f, so three times ψ) in each direction, and
on a small network that traffic, not arithmetic, dominates the CGL step. Here each program
reads the rows it needs from a filter-major copy of the maps (an image's group is
``f × HW`` values, which stays in L2 across its pairs) and writes only the ``[B, G, r]``
sums forward and the gradient backward:

  forward   grid (B, G, ⌈r / pairs_per_program⌉); each program sums |row_i − row_j| for
            its pairs.
  backward  grid (B, G, f); program (b, g, i) writes the whole gradient row of filter i:
            Σ over the pairs that contain i of c[b, g, k]·sign(m_i − m_other), walking a
            filter-sorted incidence list (``2r`` entries), so every gradient element is
            written once, deterministically, with no atomics.

Rows are processed in chunks of at most `MAX_CHUNK` positions (Triton tensors have
power-of-two sizes; the rows are zero-padded to a multiple of the chunk, and |0 − 0| = 0
adds nothing). Sums are float32 in a different order than XLA's reductions, so results
agree with the other implementations to float32 rounding.

This module imports jax (Pallas is part of jax) and `cgl_jax.kernels.xla` only; importing
it fails where jaxlib lacks Pallas' Triton bindings.
"""
import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from cgl_jax.kernels import xla

Array = jax.Array

MAX_CHUNK = 1024  # positions per loaded row chunk (a power of two)
# Forward: pairs summed by one program (unrolled, so their loads are in flight together).
PAIRS_PER_PROGRAM = 8
NUM_WARPS = 4


class _Options(NamedTuple):
  """How the kernels are run (hashable: a non-differentiable argument of the custom VJP)."""
  interpret: bool
  pairs_per_program: int
  num_warps: int


def _chunk_size(positions: int) -> int:
  return min(MAX_CHUNK, pl.next_power_of_2(positions))


def _filter_major(maps: Array, padded_positions: int) -> Array:
  """[B, HW, G, f] → [B·G·f, HWp] rows (row (b·G + g)·f + i), zero-padded positions."""
  batch, positions, groups, group_size = maps.shape
  rows = maps.transpose(0, 2, 3, 1).reshape(batch * groups * group_size, positions)
  return jnp.pad(rows, ((0, 0), (0, padded_positions - positions)))


def _sign(x: Array) -> Array:
  return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, 0.0)).astype(x.dtype)


def _forward_kernel(first_ref, second_ref, rows_ref, out_ref, *, groups, group_size,
                    num_chunks, chunk, pairs_per_program):
  b, g, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  base = (b * groups + g) * group_size
  sums = jnp.zeros((pairs_per_program,), jnp.float32)
  lane = lax.broadcasted_iota(jnp.int32, (pairs_per_program,), 0)
  for t in range(pairs_per_program):  # unrolled: independent loads in flight together
    k = block * pairs_per_program + t
    first, second = base + first_ref[k], base + second_ref[k]

    def add_chunk(c, total, first=first, second=second):
      columns = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
      return total + jnp.sum(jnp.abs(rows_ref[first, columns] - rows_ref[second, columns]))

    total = lax.fori_loop(0, num_chunks, add_chunk, jnp.zeros((), jnp.float32))
    sums = jnp.where(lane == t, total, sums)
  out_ref[...] = sums


def _backward_kernel(starts_ref, other_ref, pair_ref, cotangent_ref, rows_ref, grad_ref, *,
                     groups, group_size, num_pairs, num_chunks, chunk):
  b, g, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  base = (b * groups + g) * group_size
  start, stop = starts_ref[i], starts_ref[i + 1]
  cotangent_base = (b * groups + g) * num_pairs

  def chunk_step(c, carry):
    columns = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    own = rows_ref[base + i, columns]

    def add_incidence(e, acc):
      coefficient = cotangent_ref[cotangent_base + pair_ref[e]]
      return acc + coefficient * _sign(own - rows_ref[base + other_ref[e], columns])

    grad_ref[base + i, columns] = lax.fori_loop(start, stop, add_incidence,
                                                jnp.zeros((chunk,), jnp.float32))
    return carry

  lax.fori_loop(0, num_chunks, chunk_step, 0)


def _like(rows: Array, shape) -> jax.ShapeDtypeStruct:
  """A float32 kernel output varying over the same mesh axes as `rows` (inside shard_map)."""
  return jax.ShapeDtypeStruct(shape, jnp.float32,
                              manual_axis_type=jax.typeof(rows).manual_axis_type)


def _pad_to(x: Array, length: int) -> Array:
  return jnp.pad(x, (0, length - x.shape[0]))


def _pair_l1(options: _Options, maps: Array, pair_indices: Array) -> Array:
  return _pair_l1_fwd(options, maps, pair_indices)[0]


def _pair_l1_fwd(options: _Options, maps: Array, pair_indices: Array):
  batch, positions, groups, group_size = maps.shape
  num_pairs = pair_indices.shape[0]
  chunk = _chunk_size(positions)
  num_chunks = pl.cdiv(positions, chunk)
  rows = _filter_major(maps, num_chunks * chunk)
  num_blocks = pl.cdiv(num_pairs, options.pairs_per_program)
  padded_pairs = num_blocks * options.pairs_per_program  # dummy pairs (0, 0) sum to 0, then dropped
  first = _pad_to(pair_indices[:, 0].astype(jnp.int32), padded_pairs)
  second = _pad_to(pair_indices[:, 1].astype(jnp.int32), padded_pairs)
  kernel = functools.partial(_forward_kernel, groups=groups, group_size=group_size,
                             num_chunks=num_chunks, chunk=chunk,
                             pairs_per_program=options.pairs_per_program)
  any_space = pl.BlockSpec(memory_space=pl.ANY)
  sums = pl.pallas_call(
      kernel,
      out_shape=_like(rows, (batch, groups, padded_pairs)),
      grid=(batch, groups, num_blocks),
      in_specs=[any_space, any_space, any_space],
      out_specs=pl.BlockSpec((None, None, options.pairs_per_program),
                             lambda b, g, k: (b, g, k)),
      compiler_params=pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1),
      interpret=options.interpret,
      name='cgl_pair_l1_forward',
  )(first, second, rows)
  return sums[..., :num_pairs], (rows, pair_indices, maps)


def _pair_l1_bwd(options: _Options, residuals, cotangent):
  rows, pair_indices, maps = residuals
  batch, positions, groups, group_size = maps.shape
  num_pairs = pair_indices.shape[0]
  chunk = _chunk_size(positions)
  num_chunks = rows.shape[1] // chunk
  starts, _, other, pair = xla.pair_incidences(pair_indices, group_size)
  kernel = functools.partial(_backward_kernel, groups=groups, group_size=group_size,
                             num_pairs=num_pairs, num_chunks=num_chunks, chunk=chunk)
  any_space = pl.BlockSpec(memory_space=pl.ANY)
  grad_rows = pl.pallas_call(
      kernel,
      out_shape=_like(rows, rows.shape),
      grid=(batch, groups, group_size),
      in_specs=[any_space] * 5,
      out_specs=any_space,
      compiler_params=pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1),
      interpret=options.interpret,
      name='cgl_pair_l1_backward',
  )(starts, other, pair, cotangent.reshape(-1), rows)
  grad = grad_rows[:, :positions].reshape(batch, groups, group_size, positions)
  return grad.transpose(0, 3, 1, 2), None


_pair_l1 = jax.custom_vjp(_pair_l1, nondiff_argnums=(0,))
_pair_l1.defvjp(_pair_l1_fwd, _pair_l1_bwd)


def pair_l1(x: Array, pair_indices: Array, *, num_groups: int, interpret: bool = False,
            pairs_per_program: int = PAIRS_PER_PROGRAM, num_warps: int = NUM_WARPS) -> Array:
  """Σ_hw |x[b, hw, g·f + i] − x[b, hw, g·f + j]| per pair: ``[B, HW, C]`` → ``[B, G, r]``.

  Args:
    x: ``[B, HW, C]`` float32 soft masks (the first G·f channels are read).
    pair_indices: int ``[r, 2]`` pairs (i, j) with values in ``[0, f)``.
    num_groups: G.
    interpret: run the kernels in Pallas' interpreter (any backend; for tests).
    pairs_per_program: pairs summed by one forward program.
    num_warps: Triton warps per program.

  Returns:
    ``[B, G, r]`` float32. Reverse-mode differentiable in ``x``.
  """
  if x.dtype != jnp.float32:
    raise ValueError(f'the Pallas pair sums compute in float32; got x of dtype {x.dtype}.')
  options = _Options(bool(interpret), int(pairs_per_program), int(num_warps))
  return _pair_l1(options, xla.grouped_maps(x, num_groups), pair_indices)
