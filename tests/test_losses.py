"""cgl_jax.losses (its own jax.numpy code): analytic values, gradients, safety, dtypes, errors.

tests/test_kernels.py runs the group-coherence and L_s tests through every implementation
of `cgl_jax.kernels`.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cgl_jax import losses


def uniform(seed, shape, low=0.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def coherence_variants(num_groups, group_size):
  """Every (pairs, reduction) combination as keyword dicts for group_coherence."""
  sampled = dict(pairs='sampled', key=jax.random.PRNGKey(0), num_pairs=4 * group_size)
  return [dict(pairs='exact', reduction=r) for r in losses.REDUCTIONS] + [
      dict(sampled, reduction=r) for r in losses.REDUCTIONS]


def variant_id(options):
  return f"{options['pairs']}-{options['reduction']}"


# ----------------------------------------------------------------------------
# Analytic values.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('options', coherence_variants(2, 3), ids=variant_id)
def test_identical_maps_have_zero_coherence(options, maybe_jit):
  # 2 groups of 3 identical filters each (+1 free channel that differs).
  group_maps = uniform(0, (3, 4, 4, 2))
  psi = np.concatenate([np.repeat(group_maps, 3, axis=-1), uniform(1, (3, 4, 4, 1))], -1)
  got = maybe_jit(lambda x: losses.group_coherence(x, 2, **options))(psi)
  np.testing.assert_allclose(got, [0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize('options', coherence_variants(2, 4), ids=variant_id)
def test_disjoint_binary_masks_have_coherence_one(options, maybe_jit):
  # Channel c fires only at pixel c of a 3×3 map: every pair is disjoint.
  psi = np.zeros((2, 3, 3, 9), np.float32)
  for c in range(9):
    psi[:, c // 3, c % 3, c] = 1.0
  got = maybe_jit(lambda x: losses.group_coherence(x, 2, **options))(psi)
  np.testing.assert_allclose(got, [1.0, 1.0], rtol=1e-6)


def test_soft_jaccard_is_one_minus_iou_on_binary_masks(maybe_jit):
  rng = np.random.default_rng(2)
  p = rng.random((6, 5, 7)) < 0.4
  q = rng.random((6, 5, 7)) < 0.6
  iou = (p & q).sum((1, 2)) / (p | q).sum((1, 2))
  got = maybe_jit(lambda a, b: losses.soft_jaccard_distance(a, b, axis=(1, 2)))(
      p.astype(np.float32), q.astype(np.float32))
  np.testing.assert_allclose(got, 1.0 - iou, rtol=1e-6)


def test_soft_jaccard_of_empty_masks_is_zero_with_zero_gradient():
  zeros = jnp.zeros((4, 4))
  value, grads = jax.value_and_grad(
      lambda p, q: losses.soft_jaccard_distance(p, q, axis=None), argnums=(0, 1))(zeros, zeros)
  assert value == 0.0
  assert all(np.all(g == 0) for g in grads)


def test_pooled_and_per_sample_differ_as_defined():
  # Image 0: the two filters agree (D = 0); image 1: they are disjoint (D = 1)
  # and hold twice the mass. per_sample averages D over images; pooled pools
  # the norms over images first, so the heavier image weighs more.
  psi = np.zeros((2, 2, 2, 2), np.float32)
  psi[0, 0, 0, :] = 1.0  # both filters on pixel (0, 0): D = 0
  psi[1, 0, :, 0] = [1.0, 1.0]  # filter 0 on row 0 ...
  psi[1, 1, :, 1] = [1.0, 1.0]  # ... filter 1 on row 1: D = 1
  per_sample = losses.group_coherence(psi, 1, reduction='per_sample')
  pooled = losses.group_coherence(psi, 1, reduction='pooled')
  np.testing.assert_allclose(per_sample, [0.5], rtol=1e-6)
  # Pooled L1 norms: ‖p‖ = 3, ‖q‖ = 3, ‖p − q‖ = 4 → D = 8 / 10.
  np.testing.assert_allclose(pooled, [0.8], rtol=1e-6)


@pytest.mark.parametrize('mass', [1.0, 0.3])
def test_single_pixel_map_spatial_concentration(mass, maybe_jit):
  psi = np.zeros((1, 6, 5, 1), np.float32)
  psi[0, 4, 3, 0] = mass
  # With eps = 0 the centre is the pixel itself: L_s = 0.
  np.testing.assert_allclose(
      maybe_jit(lambda x: losses.spatial_concentration(x, eps=0.0))(psi), 0.0, atol=1e-7)
  # With eps, c = j·m/(m+eps) is pulled towards the origin by ‖j‖·eps/(m+eps).
  eps = 1e-4
  expected = mass / (mass + eps) * 5.0 * eps / (mass + eps)  # ‖(4, 3)‖ = 5
  # rtol: j − c (~5e-4) cancels float32 values of ~5, losing ~3 digits.
  np.testing.assert_allclose(
      maybe_jit(lambda x: losses.spatial_concentration(x, eps=eps))(psi), expected, rtol=2e-3)


def test_two_pixel_map_spatial_concentration():
  # Equal mass at (0, 0) and (3, 4): the centre is the midpoint, each pixel is
  # 2.5 from it. A second, empty channel contributes 0 to the mean over B·C.
  psi = np.zeros((1, 4, 5, 2), np.float32)
  psi[0, 0, 0, 0] = psi[0, 3, 4, 0] = 0.5
  np.testing.assert_allclose(losses.spatial_concentration(psi, eps=0.0), 2.5 / 2, rtol=1e-6)


def test_block_norm_and_group_relevance_by_hand(maybe_jit):
  # 5 output filters, G = 2 → f = 2, filter 4 is free (its 9s are ignored).
  kernel = np.zeros((1, 1, 2, 5), np.float32)
  kernel[0, 0] = [[3, 0, 1, 1, 9], [4, 0, 1, -1, 9]]
  relevance = maybe_jit(lambda k: losses.group_relevance(k, 2))(kernel)
  np.testing.assert_allclose(relevance, [5.0, 2.0], rtol=1e-6)
  for (p, q), expected in {(2, 1): 7.0, (1, 1): 11.0, (2, 2): np.sqrt(29.0),
                           (np.inf, 1): 5.0, (2, np.inf): 5.0}.items():
    got = maybe_jit(lambda k: losses.block_norm(k, 2, p=p, q=q))(kernel)
    np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f'p={p}, q={q}')


def test_orthogonality_by_hand(maybe_jit):
  fn = maybe_jit(losses.orthogonality)
  rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(4, 4)))[0]
  orthonormal = rotation.T.reshape(1, 1, 4, 4).astype(np.float32)  # filters = rows
  np.testing.assert_allclose(fn(orthonormal), 0.0, atol=1e-5)
  # 2·I as a 1×1 conv: W Wᵀ − I = 3·I, Frobenius norm 3·sqrt(3).
  np.testing.assert_allclose(fn(2 * np.eye(3, dtype=np.float32)[None, None]),
                             3 * np.sqrt(3.0), rtol=1e-6)


def test_soft_masks_standardises_per_channel(maybe_jit):
  # Channel 0 is ±sqrt(3) (ddof=1 std 2); channel 1 is constant (std 0 → eps only).
  values = np.array([-1.0, 1.0, -1.0, 1.0], np.float32) * np.sqrt(3.0)
  preact = np.stack([values, np.full(4, 0.01, np.float32)], -1).reshape(1, 2, 2, 2)
  psi = maybe_jit(lambda a: losses.soft_masks(a, scale=2.0, shift=0.5, eps=5e-3))(preact)
  std = np.std(values, ddof=1)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  np.testing.assert_allclose(psi[..., 0].ravel(), sigmoid(2 * values / (std + 5e-3) + 0.5),
                             rtol=1e-6)
  np.testing.assert_allclose(psi[..., 1], sigmoid(2 * 0.01 / 5e-3 + 0.5), rtol=1e-6)


def test_soft_masks_bn_is_sigmoid_of_y_over_gamma(maybe_jit):
  bn_out = np.array([0.5, -1.0, 2.0], np.float32).reshape(1, 1, 1, 3)
  gamma = np.array([2.0, -0.5, 0.0], np.float32)  # 0 → +eps
  got = maybe_jit(lambda y, g: losses.soft_masks_bn(y, g, eps=0.1))(bn_out, gamma)
  np.testing.assert_allclose(got.ravel(), 1 / (1 + np.exp(-np.array([0.25, 2.0, 20.0]))),
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# Gradients (finite differences in float64).
# ----------------------------------------------------------------------------


def _check_rev_grads(fn, *args):
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in args)
    # jit: check_grads evaluates fn many times; compile it once.
    check_grads(jax.jit(fn), args, order=1, modes=['rev'], eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('options', coherence_variants(2, 3), ids=variant_id)
def test_group_coherence_gradient_matches_finite_differences(options):
  psi = uniform(4, (2, 3, 3, 7), 0.05, 0.95)
  _check_rev_grads(lambda x: losses.group_coherence(x, 2, **options), psi)


@pytest.mark.parametrize('options', coherence_variants(2, 3), ids=variant_id)
def test_forward_mode_agrees_with_reverse_mode(options):
  """The jax.numpy code has ordinary derivatives: jvp = vjp (also for L_s)."""
  with jax.enable_x64(True):
    psi = jnp.asarray(uniform(13, (2, 3, 3, 7), 0.05, 0.95), jnp.float64)
    tangent = jnp.asarray(uniform(14, psi.shape, -1.0, 1.0), jnp.float64)
    readout = jnp.array([0.7, -1.3])
    for fn in (lambda x: losses.group_coherence(x, 2, **options) @ readout,
               losses.spatial_concentration):
      _, forward = jax.jvp(fn, (psi,), (tangent,))
      reverse = jnp.vdot(jax.grad(fn)(psi), tangent)
      np.testing.assert_allclose(forward, reverse, rtol=1e-10)


def test_pair_sums_and_per_map_replace_the_inner_pieces(maybe_jit):
  """The functions receive what their contracts say, and their results are used."""
  psi = jnp.asarray(uniform(15, (2, 3, 4, 7)))  # G = 2, f = 3, one free channel
  pairs = jnp.array([(0, 1), (2, 0)], jnp.int32)
  seen = {}

  def doubled_pair_sums(x, pair_indices, *, num_groups):
    seen['pair_sums'] = (x.shape, x.dtype, pair_indices.shape, num_groups)
    return 2 * losses.pair_l1_sums(x, pair_indices, num_groups=num_groups)

  def doubled_per_map(x, eps):
    seen['per_map'] = (x.shape, eps)
    return 2 * losses.spatial_concentration_maps(x, eps)

  got = maybe_jit(lambda x: losses.group_coherence(
      x, 2, pairs='sampled', pair_indices=pairs, pair_sums=doubled_pair_sums))(psi)
  assert seen['pair_sums'] == ((2, 12, 7), jnp.float32, (2, 2), 2)
  # D = 2d / (a + b + d) with d doubled, by hand from the per-image L1 norms.
  grouped = np.asarray(psi).reshape(2, 12, 7)[..., :6].reshape(2, 12, 2, 3)
  first, second = grouped[..., [0, 2]], grouped[..., [1, 0]]
  diff = 2 * np.abs(first - second).sum(1)
  want = (2 * diff / (np.abs(first).sum(1) + np.abs(second).sum(1) + diff)).mean((0, 2))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got = maybe_jit(lambda x: losses.spatial_concentration(x, eps=0.01,
                                                          per_map=doubled_per_map))(psi)
  assert seen['per_map'] == ((2, 3, 4, 7), 0.01)
  np.testing.assert_allclose(got, 2 * losses.spatial_concentration(psi, eps=0.01), rtol=1e-6)


def test_other_gradients_match_finite_differences():
  rng = np.random.default_rng(5)
  preact = rng.normal(size=(2, 3, 3, 3))
  weights = rng.normal(size=(2, 3, 3, 3))  # a random linear read-out of ψ
  _check_rev_grads(lambda a, s: jnp.sum(weights * losses.soft_masks(a, scale=s)),
                   preact, 1.3)
  _check_rev_grads(lambda y, g: jnp.sum(weights * losses.soft_masks_bn(y, g)),
                   preact, rng.normal(size=3))
  _check_rev_grads(losses.spatial_concentration, uniform(6, (2, 4, 5, 3), 0.05, 1.0))
  kernel = rng.normal(size=(2, 2, 3, 7))
  _check_rev_grads(lambda k: losses.block_norm(k, 3), kernel)
  _check_rev_grads(lambda k: losses.block_norm(k, 2, p=3, q=1.5), kernel)
  _check_rev_grads(losses.orthogonality, kernel)


# ----------------------------------------------------------------------------
# Numerical safety: finite values and gradients at the singular points.
# ----------------------------------------------------------------------------


def _assert_finite_value_and_grad(fn, x):
  value, grad = jax.jit(jax.value_and_grad(lambda a: jnp.sum(fn(a))))(x)
  assert np.isfinite(value), value
  assert np.all(np.isfinite(grad)), grad
  return value, grad


@pytest.mark.parametrize('fill', [0.0, 0.5], ids=['all_zero', 'constant'])
@pytest.mark.parametrize('options', coherence_variants(2, 3), ids=variant_id)
def test_group_coherence_is_zero_and_finite_on_degenerate_maps(fill, options):
  psi = jnp.full((2, 3, 3, 6), fill)
  value, _ = _assert_finite_value_and_grad(
      lambda x: losses.group_coherence(x, 2, **options), psi)
  assert value == 0.0


@pytest.mark.parametrize('fill', [0.0, 0.5], ids=['all_zero', 'constant'])
def test_spatial_concentration_is_finite_on_degenerate_maps(fill):
  psi = jnp.full((2, 3, 4, 2), fill)
  value, _ = _assert_finite_value_and_grad(losses.spatial_concentration, psi)
  if fill == 0.0:
    assert value == 0.0
  # A single-pixel map sits exactly on its centre (eps = 0): sqrt at 0.
  single = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
  _assert_finite_value_and_grad(lambda x: losses.spatial_concentration(x, eps=0.0), single)


def test_soft_masks_are_finite_on_constant_and_zero_preactivations():
  for preact in (jnp.zeros((2, 3, 3, 4)), jnp.full((2, 3, 3, 4), 7.0)):
    psi, grad = _assert_finite_value_and_grad(losses.soft_masks, preact)
  bn_grads = jax.grad(lambda y, g: jnp.sum(losses.soft_masks_bn(y, g)), argnums=(0, 1))(
      jnp.ones((1, 2, 2, 3)), jnp.zeros(3))
  assert all(np.all(np.isfinite(g)) for g in bn_grads)


def test_dead_kernel_group_has_finite_zero_gradient():
  kernel = jnp.asarray(np.random.default_rng(7).normal(size=(3, 3, 2, 7)), jnp.float32)
  kernel = kernel.at[..., 2:4].set(0.0)  # group 1 of G = 3 (f = 2) is dead
  for fn in (lambda k: losses.block_norm(k, 3), lambda k: losses.group_relevance(k, 3),
             lambda k: losses.block_norm(k, 3, p=3, q=2)):
    _, grad = _assert_finite_value_and_grad(fn, kernel)
    assert np.all(grad[..., 2:4] == 0.0)
    assert np.all(grad[..., 6] == 0.0)  # the free filter is not penalised
  np.testing.assert_allclose(losses.group_relevance(kernel, 3)[1], 0.0)
  _assert_finite_value_and_grad(lambda k: losses.block_norm(k, 2), jnp.zeros((1, 1, 2, 4)))
  _assert_finite_value_and_grad(losses.orthogonality, jnp.eye(3)[None, None])


# ----------------------------------------------------------------------------
# dtypes, vmap, named axes.
# ----------------------------------------------------------------------------


def _all_functions():
  key = jax.random.PRNGKey(0)
  return {
      'soft_masks': lambda x: losses.soft_masks(x),
      'soft_masks_bn': lambda x: losses.soft_masks_bn(x, jnp.linspace(-1, 1, x.shape[-1])),
      'soft_jaccard_distance': lambda x: losses.soft_jaccard_distance(
          x[..., 0], x[..., 1], axis=(1, 2)),
      'coherence_exact': lambda x: losses.group_coherence(x, 2),
      'coherence_sampled_pooled': lambda x: losses.group_coherence(
          x, 2, pairs='sampled', key=key, reduction='pooled'),
      'spatial_concentration': lambda x: losses.spatial_concentration(x),
      'block_norm': lambda x: losses.block_norm(x, 2),
      'group_relevance': lambda x: losses.group_relevance(x, 2),
      'orthogonality': lambda x: losses.orthogonality(x),
  }


@pytest.mark.parametrize('name', sorted(_all_functions()))
def test_bfloat16_inputs_accumulate_in_float32(name):
  fn = jax.jit(_all_functions()[name])
  x_bf16 = jnp.asarray(uniform(8, (2, 4, 4, 6), 0.0, 1.0), jnp.bfloat16)
  got = fn(x_bf16)
  assert got.dtype == jnp.float32
  # Same as float32 on the same (bf16-rounded) numbers: nothing ran in bf16.
  np.testing.assert_allclose(got, fn(x_bf16.astype(jnp.float32)), rtol=1e-6, atol=1e-7)
  grad = jax.grad(lambda x: jnp.sum(fn(x)).astype(jnp.float32))(x_bf16)
  assert grad.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize('name', sorted(_all_functions()))
def test_vmap_matches_a_loop(name):
  fn = jax.jit(_all_functions()[name])
  stack = jnp.asarray(uniform(9, (3, 2, 4, 4, 6)))
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(stack), jnp.stack([fn(x) for x in stack]),
                             rtol=1e-6, atol=1e-7)


def test_axis_name_under_vmap_gives_the_full_batch_statistics():
  """psum over a vmapped batch axis: the cheap in-process version of the pmap test."""
  preact = jnp.asarray(np.random.default_rng(10).normal(size=(8, 3, 3, 6)), jnp.float32)
  psi = losses.soft_masks(preact)
  shards = preact.reshape(4, 2, 3, 3, 6)
  np.testing.assert_allclose(
      jax.jit(jax.vmap(lambda a: losses.soft_masks(a, axis_name='b'), axis_name='b'))(
          shards).reshape(psi.shape), psi, rtol=1e-6)
  for options in coherence_variants(2, 3):
    full = losses.group_coherence(psi, 2, **options)
    sharded = jax.jit(jax.vmap(
        lambda x: losses.group_coherence(x, 2, axis_name='b', **options), axis_name='b'))(
            psi.reshape(4, 2, 3, 3, 6))
    np.testing.assert_allclose(sharded, jnp.broadcast_to(full, (4, 2)), rtol=1e-6,
                               err_msg=str(options))


def test_exact_group_coherence_handles_large_groups_without_pairwise_tensor():
  """f = 100, B = 256, 13×13 (the docstring's example) compiles to O(|ψ|) memory."""
  psi = jax.ShapeDtypeStruct((256, 13, 13, 500), jnp.float32)
  loss = lambda x: losses.group_coherence(x, 5).sum()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(psi).compile()
  memory = compiled.memory_analysis()
  psi_bytes = 256 * 13 * 13 * 500 * 4
  if memory is None:
    pytest.skip('no memory analysis on this backend')
  # A materialised pairwise tensor alone would be 100·|ψ|; the scan needs ~3.
  assert memory.temp_size_in_bytes < 5 * psi_bytes, memory.temp_size_in_bytes / psi_bytes


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def _raises(message):
  return pytest.raises(ValueError, match=re.escape(message))


def test_errors_name_the_argument_and_shapes():
  psi = jnp.zeros((2, 3, 3, 8))
  with _raises('psi must have rank 4 [B, H, W, C]; got shape (3, 3, 8).'):
    losses.group_coherence(psi[0], 2)
  with _raises('num_groups=9 exceeds the 8 channels of psi with shape (2, 3, 3, 8).'):
    losses.group_coherence(psi, 9)
  with _raises('num_groups must be a positive integer; got 0 (psi shape (2, 3, 3, 8)).'):
    losses.group_coherence(psi, 0)
  with _raises('num_groups must be a positive integer; got 2.0 (psi shape (2, 3, 3, 8)).'):
    losses.group_coherence(psi, 2.0)
  with _raises('group_coherence needs >= 2 filters per group; psi with shape (2, 3, 3, 8) '
               'and num_groups=5 gives 1.'):
    losses.group_coherence(psi, 5)
  with _raises("reduction must be one of ('per_sample', 'pooled'); got 'mean'."):
    losses.group_coherence(psi, 2, reduction='mean')
  with _raises("pairs must be one of ('exact', 'sampled'); got 'all'."):
    losses.group_coherence(psi, 2, pairs='all')
  with _raises("pairs='sampled' needs a PRNG key (or pair_indices); got key=None."):
    losses.group_coherence(psi, 2, pairs='sampled')
  with _raises('num_pairs must be a positive integer; got 0.'):
    losses.group_coherence(psi, 2, pairs='sampled', key=jax.random.PRNGKey(0), num_pairs=0)
  with _raises("num_pairs, pair_indices and pair_sums apply to pairs='sampled' only; got "
               "num_pairs=4, pair_indices None, pair_sums None with pairs='exact'."):
    losses.group_coherence(psi, 2, num_pairs=4)
  with _raises("got num_pairs=None, pair_indices None, pair_sums given with pairs='exact'."):
    losses.group_coherence(psi, 2, pair_sums=losses.pair_l1_sums)
  with _raises('pair_indices must have shape [r, 2] with r >= 1; got shape (3,).'):
    losses.group_coherence(psi, 2, pairs='sampled', pair_indices=jnp.zeros(3, jnp.int32))
  with _raises('pair_indices must be integers; got dtype float32.'):
    losses.group_coherence(psi, 2, pairs='sampled', pair_indices=jnp.zeros((3, 2)))
  with _raises('pair_indices must lie in [0, 4) (filters per group); got values in [0, 4].'):
    losses.group_coherence(psi, 2, pairs='sampled', pair_indices=jnp.array([[0, 4]]))
  with _raises('pass either pair_indices or key/num_pairs, not both.'):
    losses.group_coherence(psi, 2, pairs='sampled', key=jax.random.PRNGKey(0),
                           pair_indices=jnp.zeros((3, 2), jnp.int32))
  with _raises('num_filters must be >= 2 to form pairs i != j; got 1.'):
    losses.sample_pairs(jax.random.PRNGKey(0), 1, 3)
  with _raises('preact must have rank 4 [B, H, W, C]; got shape (2, 8).'):
    losses.soft_masks(jnp.zeros((2, 8)))
  with _raises('soft_masks needs at least 2 values per channel for the ddof=1 standard '
               'deviation; preact has shape (1, 1, 1, 8).'):
    losses.soft_masks(jnp.zeros((1, 1, 1, 8)))
  with _raises('gamma must have shape [C] = (8,) to match bn_out with shape (2, 3, 3, 8); '
               'got shape (4,).'):
    losses.soft_masks_bn(psi, jnp.ones(4))
  with _raises('psi must have rank 4 [B, H, W, C]; got shape (3, 3).'):
    losses.spatial_concentration(jnp.zeros((3, 3)))


def test_kernel_errors_name_the_argument_and_shapes():
  kernel = jnp.zeros((3, 3, 2, 4))
  with _raises('num_groups=5 exceeds the 4 channels of kernel with shape (3, 3, 2, 4).'):
    losses.block_norm(kernel, 5)
  with _raises('num_groups must be a positive integer; got -1 (kernel shape (3, 3, 2, 4)).'):
    losses.group_relevance(kernel, -1)
  with _raises('kernel must have rank >= 2 [..., C_in, C_out] (Flax conv: '
               '[kh, kw, C_in, C_out]); got shape (4,).'):
    losses.block_norm(jnp.zeros(4), 2)
  with _raises('kernel must have rank >= 2'):
    losses.orthogonality(jnp.zeros(4))
  with _raises('p must be a real number >= 1 (or inf); got 0.5.'):
    losses.block_norm(kernel, 2, p=0.5)
  with _raises("q must be a real number >= 1 (or inf); got '2'."):
    losses.block_norm(kernel, 2, q='2')
