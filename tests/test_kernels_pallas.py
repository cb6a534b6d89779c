"""cgl_jax.kernels.pallas: the CUDA kernels of L_g's pair sums, run in Pallas' interpreter here.

The same kernel bodies run on the CPU interpreter against the XLA loop and NumPy;
tests/test_kernels.py also runs the group-coherence tests through them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax import losses
from cgl_jax.kernels import pallas
from cgl_jax.kernels import xla

interpreted = functools.partial(pallas.pair_l1, interpret=True)


def _maps(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32))


@pytest.mark.parametrize('shape, num_groups, num_pairs, options', [
    ((2, 12, 16), 3, 7, {}),      # r not a multiple of pairs_per_program, HW below a chunk
    ((2, 169, 15), 2, 16, {}),    # AlexNet's 13×13: padded to 256 positions; a free channel
    ((2, 1030, 8), 2, 9, {}),     # more than MAX_CHUNK positions: two chunks
    ((2, 12, 16), 3, 7, dict(pairs_per_program=2, num_warps=2)),
])
def test_value_and_gradient_match_the_loop(shape, num_groups, num_pairs, options, maybe_jit):
  x = _maps(0, shape)
  pairs = losses.sample_pairs(jax.random.key(1), shape[-1] // num_groups, num_pairs)
  cotangent = jax.random.normal(jax.random.key(2), (shape[0], num_groups, num_pairs))

  def value_and_grad(pair_sums):
    value, pullback = jax.vjp(lambda m: pair_sums(m, pairs, num_groups=num_groups), x)
    return value, pullback(cotangent)[0]

  want_value, want_grad = value_and_grad(xla.loop_pair_l1)
  got_value, got_grad = maybe_jit(lambda: value_and_grad(
      functools.partial(interpreted, **options)))()
  assert got_value.shape == (shape[0], num_groups, num_pairs) and got_value.dtype == jnp.float32
  np.testing.assert_allclose(got_value, want_value, rtol=2e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_matches_numpy_with_repeated_pairs_both_orders_and_ties():
  maps = np.array(_maps(3, (2, 10, 2, 4)))
  maps[..., 1] = maps[..., 0]  # filters 0 and 1 tie: |p − q| has derivative sign(0) = 0
  pairs = np.array([(0, 1), (1, 0), (2, 3), (2, 3), (3, 0)], np.int32)
  cotangent = np.random.default_rng(4).normal(size=(2, 2, 5)).astype(np.float32)
  value, pullback = jax.vjp(lambda m: interpreted(m.reshape(2, 10, 8), jnp.asarray(pairs),
                                                  num_groups=2), jnp.asarray(maps))
  first, second = maps[..., pairs[:, 0]], maps[..., pairs[:, 1]]  # [B, HW, G, r]
  np.testing.assert_allclose(value, np.abs(first - second).sum(1), rtol=1e-6)
  slope = cotangent[:, None] * np.sign(first - second)  # [B, HW, G, r]
  want = np.zeros_like(maps)
  for k, (i, j) in enumerate(pairs):
    want[..., i] += slope[..., k]
    want[..., j] -= slope[..., k]
  np.testing.assert_allclose(pullback(jnp.asarray(cotangent))[0], want, rtol=1e-6, atol=1e-7)


def test_rejects_float64_maps():
  with jax.enable_x64(True):
    x = jnp.zeros((1, 4, 3), jnp.float64)
    with pytest.raises(ValueError, match='compute in float32; got x of dtype float64'):
      pallas.pair_l1(x, jnp.array([(0, 1)], jnp.int32), num_groups=1)


def test_lowers_for_cuda_to_one_triton_kernel_each_way():
  maps = jax.ShapeDtypeStruct((2, 20, 12), jnp.float32)
  pairs = jax.ShapeDtypeStruct((5, 2), jnp.int32)
  triton = jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  grad = jax.grad(lambda m, p: jnp.sum(pallas.pair_l1(m, p, num_groups=2) ** 2))
  module = jax.export.export(jax.jit(grad), platforms=['cuda'], disabled_checks=[triton])(
      maps, pairs).mlir_module()
  assert module.count('@__gpu$xla.gpu.triton') == 2
  assert 'name = "cgl_pair_l1_forward"' in module and 'name = "cgl_pair_l1_backward"' in module
