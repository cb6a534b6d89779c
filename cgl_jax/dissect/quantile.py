"""Exact per-unit quantiles of a stream of activations, in memory independent of its length.

Network Dissection thresholds unit k at T_k, the (1 − q) quantile of all its activations over all
positions of all probe images (q = 0.005). Storing the activations (the reference writes ~12 GB of
float64 per layer on Broden) is what we avoid. Instead we select the two order statistics numpy's
default ('linear') quantile interpolates between by *radix selection* on float32 bit patterns:

  key(x) = bits(x) XOR (sign ? 0xFFFFFFFF : 0x80000000)  is a uint32 with key order = float order.

Pass p histograms digit p of the keys (``bits_per_pass[p]`` bits, default 16 + 16) among the values
whose higher digits equal the prefix found so far; the cumulative histogram tells which digit holds
the wanted rank. After the last pass the 32-bit key of x_(k) is known exactly. x_(k+1) comes from the
same last histogram, or, when x_(k) is the largest value of its block, from the running minimum of
the keys above the block (tracked in the last pass). Then, as numpy.quantile does,

  v = n·p + (1 − p) − 1 (p = 1 − q),  k = ⌊v⌋,  γ = v − k,
  T = x_(k) + (x_(k+1) − x_(k))·γ   (or x_(k+1) − (x_(k+1) − x_(k))·(1 − γ) when γ ≥ 0.5),

computed in float32 exactly like numpy, so T equals ``numpy.quantile(values, 1 - q, axis=0)``
bit for bit. The state is [C, 2^b] int32 counts per unit (C·256 KiB for b = 16), whatever the number
of values; each pass is one stream over the data (a forward pass of the model).

Approximate mode (``exact=False``): stop after the first pass and take each order statistic as the
midpoint of its histogram bin. A 16-bit bin spans [key·2^16, (key+1)·2^16): for normal floats its
width is at most 2^-7 of its lower magnitude, so |T̂ − T| ≤ 2^-8·|T| + ½·(the bin width at 0 for
values ≈ 0); `approximation_bound` returns the exact per-unit bound.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_KEY_MAX = np.uint32(0xFFFFFFFF)


def sortable_keys(values: jax.Array) -> jax.Array:
  """float32 → uint32 keys with the same order (−0 sorts just below +0; no NaNs expected)."""
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31).astype(bool)
  return bits ^ jnp.where(negative, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))


def keys_to_floats(keys: np.ndarray) -> np.ndarray:
  """Inverse of `sortable_keys` (numpy, on the host)."""
  keys = np.asarray(keys, np.uint32)
  bits = np.where(keys >> 31, keys ^ np.uint32(0x80000000), ~keys).astype(np.uint32)
  return bits.view(np.float32)


class SelectionState(NamedTuple):
  """Per-unit radix-selection state (a pytree; its size does not depend on the data size).

  prefix:    uint32 [C]  the digits of key(x_(k)) fixed by the previous passes (right-aligned).
  rank:      int32 [C]   rank of x_(k) among the values sharing that prefix.
  hist:      int32 [C, 2^b]  counts of this pass's digit among the values sharing the prefix.
  min_above: uint32 [C]  smallest key above the prefix block (for x_(k+1); last pass only).
  """
  prefix: jax.Array
  rank: jax.Array
  hist: jax.Array
  min_above: jax.Array


@dataclasses.dataclass(frozen=True)
class TopQuantile:
  """Streaming exact per-unit `1 - quantile` quantile (the threshold of the top `quantile`).

  Usage (each pass streams the same values in any order, possibly in batches of any size)::

    selector = TopQuantile(num_units=C, num_values=N, quantile=0.005)
    state = selector.init()
    for pass_index in range(selector.num_passes):
      for values, valid in batches():        # values [n, C], valid bool [n]
        state = selector.update(state, values, valid, pass_index=pass_index)
      state = selector.advance(state, pass_index=pass_index)   # host-side, cheap
    thresholds = selector.thresholds(state)  # float32 [C]

  Attributes:
    num_units: C.
    num_values: N, the number of valid values each unit will see per pass.
    quantile: q in (0, 1); the threshold is numpy.quantile(values, 1 - q) ('linear').
    bits_per_pass: digit widths, summing to 32; memory is C · 2^max(bits) int32 per state.
    exact: False stops after the first pass (see the module docstring for the bound).
  """
  num_units: int
  num_values: int
  quantile: float
  bits_per_pass: tuple[int, ...] = (16, 16)
  exact: bool = True

  def __post_init__(self):
    if not 0 < self.quantile < 1:
      raise ValueError(f'quantile must be in (0, 1), got {self.quantile}')
    if self.num_values < 1 or self.num_units < 1:
      raise ValueError(f'need num_units ≥ 1 and num_values ≥ 1, got {self.num_units}, '
                       f'{self.num_values}')
    if sum(self.bits_per_pass) != 32 or min(self.bits_per_pass) < 1:
      raise ValueError(f'bits_per_pass must be positive and sum to 32, got {self.bits_per_pass}')
    if self.num_values >= 2**31:
      raise ValueError(f'num_values={self.num_values} overflows the int32 counts; '
                       'dissect fewer positions per unit')

  # -- ranks, exactly as numpy.quantile(method='linear') computes them --------------------------

  @property
  def _virtual_index(self) -> float:
    p = 1.0 - self.quantile
    return self.num_values * p + (1 + p * (1 - 1 - 1)) - 1

  @property
  def ranks(self) -> tuple[int, int, float]:
    """(k, k + 1, γ) clipped as numpy does (both to n − 1 at the top)."""
    v = self._virtual_index
    last = self.num_values - 1
    if v >= last:
      return last, last, v - math.floor(v)
    k = max(0, math.floor(v))
    return k, k + 1, v - math.floor(v)

  @property
  def num_passes(self) -> int:
    return len(self.bits_per_pass) if self.exact else 1

  # -- streaming ---------------------------------------------------------------------------------

  def init(self) -> SelectionState:
    return self._fresh_state(np.zeros(self.num_units, np.uint32),
                             np.full(self.num_units, self.ranks[0], np.int32), pass_index=0)

  def _fresh_state(self, prefix, rank, *, pass_index: int) -> SelectionState:
    bins = 1 << self.bits_per_pass[pass_index]
    return SelectionState(jnp.asarray(prefix, jnp.uint32), jnp.asarray(rank, jnp.int32),
                          jnp.zeros((self.num_units, bins), jnp.int32),
                          jnp.full((self.num_units,), _KEY_MAX, jnp.uint32))

  def update(self, state: SelectionState, values: jax.Array, valid: jax.Array | None = None, *,
             pass_index: int) -> SelectionState:
    """Adds values [n, C] (rows with valid=False are ignored) to this pass's histogram.

    Pure and jit-compatible (`pass_index` must be static). See `histogram_update`, which needs
    no `num_values`, so one compiled update serves probe sets of any size.
    """
    if values.ndim != 2 or values.shape[1] != self.num_units:
      raise ValueError(f'values must be [n, C={self.num_units}], got {values.shape}')
    return histogram_update(state, values, valid, bits_per_pass=self.bits_per_pass,
                            pass_index=pass_index,
                            last_pass=pass_index + 1 == self.num_passes)

  def advance(self, state: SelectionState, *, pass_index: int) -> SelectionState:
    """Fixes this pass's digit of key(x_(k)); returns the state of the next pass (or the last)."""
    hist = np.asarray(state.hist)
    rank = np.asarray(state.rank)
    digit, below = _locate(hist, rank)
    if pass_index + 1 == self.num_passes:
      return state
    prefix = (np.asarray(state.prefix, np.uint64) << self.bits_per_pass[pass_index]) | digit
    return self._fresh_state(prefix.astype(np.uint32), rank - below, pass_index=pass_index + 1)

  def thresholds(self, state: SelectionState) -> np.ndarray:
    """float32 [C]: the thresholds, from the state after the last pass's `advance`."""
    k, k_next, gamma = self.ranks
    lower, upper = (self._exact_order_statistics(state, k_next - k) if self.exact
                    else self._approximate_order_statistics(state, k, k_next))
    return _lerp(lower, upper, gamma)

  def approximation_bound(self, state: SelectionState) -> np.ndarray:
    """float32 [C]: max |T̂ − T| of the approximate mode (0 in exact mode).

    Each order statistic lies in its bin [low, high) and is estimated by the bin's midpoint, so
    it is off by at most (high − low)/2; the interpolation adds float32 rounding (2 ulp).
    """
    if self.exact:
      return np.zeros(self.num_units, np.float32)
    k, k_next, _ = self.ranks
    half_widths = [(high - low) / 2 for low, high in
                   (self._bin_range(state, rank) for rank in (k, k_next))]
    estimate = self.thresholds(state)
    return (np.maximum(*half_widths) + 2 * np.spacing(np.abs(estimate))).astype(np.float32)

  # -- finishing ---------------------------------------------------------------------------------

  def _exact_order_statistics(self, state, step):
    hist = np.asarray(state.hist)
    rank = np.asarray(state.rank)
    digit, below = _locate(hist, rank)
    bits = self.bits_per_pass[-1]
    prefix = np.asarray(state.prefix, np.uint64) << bits
    key = (prefix | digit).astype(np.uint32)
    units = np.arange(self.num_units)
    # x_(k+1): the same key if its bin holds another value, else the next non-empty bin, else the
    # smallest key above this block.
    same = rank - below + 1 < hist[units, digit]
    nonempty_after = (hist > 0) & (np.arange(hist.shape[1])[None] > digit[:, None])
    has_next = nonempty_after.any(axis=1)
    next_digit = np.argmax(nonempty_after, axis=1).astype(np.uint64)
    next_key = np.where(same, key, np.where(has_next, (prefix | next_digit).astype(np.uint32),
                                            np.asarray(state.min_above)))
    if step == 0:
      next_key = key
    return keys_to_floats(key), keys_to_floats(next_key)

  def _bin_range(self, state, rank):
    """The float range [low, high) of the first-pass bin holding the value of `rank`."""
    digit, _ = _locate(np.asarray(state.hist), np.full(self.num_units, rank))
    shift = 32 - self.bits_per_pass[0]
    low = (digit << shift).astype(np.uint32)
    # The top bin ends at the largest key (NaN territory): use its last key instead.
    high = np.minimum((digit + 1) << shift, (1 << 32) - 1).astype(np.uint32)
    return keys_to_floats(low).astype(np.float64), keys_to_floats(high).astype(np.float64)

  def _approximate_order_statistics(self, state, k, k_next):
    mids = []
    for rank in (k, k_next):
      low, high = self._bin_range(state, rank)
      mids.append((low + (high - low) / 2).astype(np.float32))
    return tuple(mids)


def histogram_update(state: SelectionState, values: jax.Array, valid: jax.Array | None = None,
                     *, bits_per_pass: Sequence[int], pass_index: int, last_pass: bool,
                     values_per_chunk: int | None = None) -> SelectionState:
  """`TopQuantile.update` as a function of the digit schedule only (jit with the options static).

  Pass p adds 1 to hist[k, digit_p(key)] for every valid value of unit k whose higher digits equal
  prefix[k]; the last pass of an exact selection (p ≥ 1) also lowers min_above[k] to the smallest
  key above the prefix block. Values outside the block are dropped by the scatter (an
  out-of-range bin) rather than added as zeros: past the first pass almost all values lie
  outside, and a dropped update costs a bounds check instead of a memory write.

  `values_per_chunk` (CPU): scan over row chunks of at most this many values (rows · C), so the
  keys and bin indices of a chunk stay in cache instead of streaming [n, C] temporaries through
  memory (2^17 values: 1.3× faster in the first pass, 3× in the second on 2 cores). The counts
  do not depend on it.
  """
  num_rows, num_units = values.shape
  valid = jnp.ones((num_rows,), bool) if valid is None else valid
  rows = _rows_per_chunk(num_rows, num_units, values_per_chunk)
  update = functools.partial(_histogram_update, bits_per_pass=tuple(bits_per_pass),
                             pass_index=pass_index, last_pass=last_pass)
  if rows == num_rows:
    return update(state, values, valid)
  chunks = num_rows // rows
  state, _ = jax.lax.scan(lambda carry, chunk: (update(carry, *chunk), None), state,
                          (values.reshape(chunks, rows, num_units), valid.reshape(chunks, rows)))
  return state


def _rows_per_chunk(num_rows: int, num_units: int, values_per_chunk: int | None) -> int:
  """The largest divisor of num_rows with rows · num_units ≤ values_per_chunk (all if None)."""
  if values_per_chunk is None or num_rows * num_units <= values_per_chunk:
    return num_rows
  fitting = max(1, values_per_chunk // num_units)
  return max(d for d in range(1, fitting + 1) if num_rows % d == 0)


def _histogram_update(state, values, valid, *, bits_per_pass, pass_index, last_pass):
  num_units = values.shape[1]
  keys = sortable_keys(values)
  valid = valid[:, None]
  consumed = sum(bits_per_pass[:pass_index])
  bits = bits_per_pass[pass_index]
  digit = ((keys >> (32 - consumed - bits)) & ((1 << bits) - 1)).astype(jnp.int32)
  if consumed == 0:
    in_block = valid
  else:
    high = keys >> (32 - consumed)
    in_block = (high == state.prefix) & valid
  num_bins = num_units << bits
  flat_bin = jnp.where(in_block, digit + jnp.arange(num_units, dtype=jnp.int32) * (1 << bits),
                       num_bins)  # num_bins: out of range, dropped
  hist = state.hist.reshape(-1).at[flat_bin.reshape(-1)].add(
      1, mode='drop').reshape(state.hist.shape)
  min_above = state.min_above
  if consumed and last_pass:  # only the last pass needs x_(k+1)
    above = (high > state.prefix) & valid
    min_above = jnp.minimum(min_above, jnp.min(jnp.where(above, keys, _KEY_MAX), axis=0))
  return state._replace(hist=hist, min_above=min_above)


def _locate(hist: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per unit, the bin holding the value of 0-based `rank`, and the count below that bin."""
  cumulative = np.cumsum(hist, axis=1, dtype=np.int64)
  digit = np.sum(cumulative <= rank[:, None], axis=1)
  if np.any(digit >= hist.shape[1]):
    bad = np.flatnonzero(digit >= hist.shape[1])[:5]
    raise RuntimeError(f'units {bad.tolist()} saw fewer values than num_values (rank beyond the '
                       'histogram): every pass must stream the same values')
  units = np.arange(hist.shape[0])
  below = cumulative[units, digit] - hist[units, digit]
  return digit.astype(np.uint64), below


def _lerp(lower: np.ndarray, upper: np.ndarray, gamma: float) -> np.ndarray:
  """numpy.quantile's interpolation, in float32 like numpy with a Python-float weight."""
  lower = np.asarray(lower, np.float32)
  upper = np.asarray(upper, np.float32)
  diff = upper - lower
  result = lower + diff * gamma
  if gamma >= 0.5:
    result = upper - diff * (1 - gamma)
  return result.astype(np.float32)


def streaming_top_quantile(batches, *, num_units: int, num_values: int, quantile: float,
                           exact: bool = True, bits_per_pass: Sequence[int] = (16, 16)):
  """Convenience driver: `batches()` returns a fresh iterable of (values [n, C], valid [n])."""
  selector = TopQuantile(num_units=num_units, num_values=num_values, quantile=quantile,
                         bits_per_pass=tuple(bits_per_pass), exact=exact)
  update = jax.jit(selector.update, static_argnames='pass_index')
  state = selector.init()
  for pass_index in range(selector.num_passes):
    for values, valid in batches():
      state = update(state, values, valid, pass_index=pass_index)
    state = selector.advance(state, pass_index=pass_index)
  return selector.thresholds(state), selector.approximation_bound(state)
