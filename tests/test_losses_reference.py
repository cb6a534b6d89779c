"""cgl_jax.losses against the independent NumPy loop reference (losses_reference.py)."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax import losses
import losses_reference as ref

TOL = dict(rtol=1e-5, atol=1e-5)
# 2 images of 5×4, 11 channels: G = 3 gives f = 3 and 2 free channels.
SHAPE = (2, 5, 4, 11)
NUM_GROUPS = 3


def random_psi(seed, shape=SHAPE):
  return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def test_soft_masks(maybe_jit):
  preact = np.random.default_rng(0).normal(0.3, 2.0, SHAPE).astype(np.float32)
  got = maybe_jit(lambda a: losses.soft_masks(a, scale=1.5, shift=-0.2))(preact)
  np.testing.assert_allclose(got, ref.soft_masks(preact, scale=1.5, shift=-0.2), **TOL)


def test_soft_masks_bn(maybe_jit):
  rng = np.random.default_rng(1)
  bn_out = rng.normal(size=SHAPE).astype(np.float32)
  gamma = rng.normal(size=SHAPE[-1]).astype(np.float32)
  gamma[:3] = [0.0, 1e-4, -1e-4]  # guarded by eps, sign kept
  got = maybe_jit(lambda y, g: losses.soft_masks_bn(y, g, scale=0.7, shift=0.1))(
      bn_out, gamma)
  np.testing.assert_allclose(
      got, ref.soft_masks_bn(bn_out, gamma, scale=0.7, shift=0.1), **TOL)


def test_soft_jaccard_distance(maybe_jit):
  p, q = random_psi(2, (3, 4, 5)), random_psi(3, (3, 4, 5))
  got = maybe_jit(lambda a, b: losses.soft_jaccard_distance(a, b, axis=(1, 2)))(p, q)
  np.testing.assert_allclose(got, [ref.soft_jaccard(p[b], q[b]) for b in range(3)], **TOL)


@pytest.mark.parametrize('reduction', losses.REDUCTIONS)
def test_group_coherence_exact(reduction, maybe_jit):
  for seed, num_groups in [(4, NUM_GROUPS), (5, 2), (6, 1)]:  # f = 3, 5, 11
    psi = random_psi(seed)
    got = maybe_jit(lambda x: losses.group_coherence(
        x, num_groups, pairs='exact', reduction=reduction))(psi)
    np.testing.assert_allclose(
        got, ref.group_coherence(psi, num_groups, reduction=reduction), **TOL)


@pytest.mark.parametrize('reduction', losses.REDUCTIONS)
def test_group_coherence_explicit_pairs(reduction, maybe_jit):
  psi = random_psi(7)
  pairs = [(0, 1), (2, 0), (1, 2), (0, 1), (2, 1)]  # repeats count twice
  got = maybe_jit(lambda x, idx: losses.group_coherence(
      x, NUM_GROUPS, pairs='sampled', pair_indices=idx, reduction=reduction))(
          psi, np.array(pairs, np.int32))
  np.testing.assert_allclose(
      got, ref.group_coherence(psi, NUM_GROUPS, pairs=pairs, reduction=reduction), **TOL)


def test_group_coherence_sampled_uses_sample_pairs():
  """'sampled' with a key = explicit pairs from sample_pairs(key, f, 3·f)."""
  psi = random_psi(8)
  key = jax.random.PRNGKey(3)
  drawn = np.asarray(losses.sample_pairs(key, 3, 9))
  got = losses.group_coherence(psi, NUM_GROUPS, pairs='sampled', key=key)
  np.testing.assert_allclose(
      got, ref.group_coherence(psi, NUM_GROUPS, pairs=[tuple(p) for p in drawn]), **TOL)


def test_spatial_concentration(maybe_jit):
  psi = random_psi(9)
  psi[0, :, :, 0] = 0.0  # an empty map
  got = maybe_jit(losses.spatial_concentration)(psi)
  np.testing.assert_allclose(got, ref.spatial_concentration(psi), **TOL)


@pytest.mark.parametrize('p,q', [(2, 1), (1, 2), (3, 1.5), (np.inf, 1), (2, np.inf)])
def test_block_norm(p, q, maybe_jit):
  kernel = np.random.default_rng(10).normal(size=(3, 3, 2, 11)).astype(np.float32)
  got = maybe_jit(lambda k: losses.block_norm(k, NUM_GROUPS, p=p, q=q))(kernel)
  np.testing.assert_allclose(got, ref.block_norm(kernel, NUM_GROUPS, p=p, q=q), **TOL)


def test_group_relevance(maybe_jit):
  kernel = np.random.default_rng(11).normal(size=(3, 3, 2, 11)).astype(np.float32)
  got = maybe_jit(lambda k: losses.group_relevance(k, NUM_GROUPS))(kernel)
  np.testing.assert_allclose(got, ref.group_relevance(kernel, NUM_GROUPS), **TOL)


def test_orthogonality(maybe_jit):
  kernel = np.random.default_rng(12).normal(0, 0.2, size=(3, 3, 2, 6)).astype(np.float32)
  got = maybe_jit(losses.orthogonality)(kernel)
  np.testing.assert_allclose(got, ref.orthogonality(kernel), **TOL)


def test_sample_pairs_is_uniform_over_ordered_pairs():
  f, draws = 4, 24_000
  drawn = np.asarray(losses.sample_pairs(jax.random.PRNGKey(0), f, draws))
  assert drawn.shape == (draws, 2) and drawn.dtype == np.int32
  assert np.all(drawn[:, 0] != drawn[:, 1])
  assert drawn.min() == 0 and drawn.max() == f - 1
  counts = np.zeros((f, f))
  np.add.at(counts, (drawn[:, 0], drawn[:, 1]), 1)
  expected = draws / (f * (f - 1))
  off_diagonal = counts[~np.eye(f, dtype=bool)]
  # Chi-square with 11 degrees of freedom: 35 is beyond its 99.97 % quantile.
  assert np.sum((off_diagonal - expected) ** 2 / expected) < 35


@pytest.mark.parametrize('reduction', losses.REDUCTIONS)
def test_sampled_mean_over_keys_converges_to_exact(reduction):
  psi = jnp.asarray(random_psi(13))
  exact = losses.group_coherence(psi, NUM_GROUPS, reduction=reduction)
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  sampled = jax.vmap(lambda k: losses.group_coherence(
      psi, NUM_GROUPS, pairs='sampled', key=k, reduction=reduction))(keys)
  # Unbiased: the mean over n keys is within 4 standard errors (~1/sqrt(n)) of
  # 'exact', while single draws scatter much more widely.
  standard_error = sampled.std(0) / np.sqrt(len(keys))
  error = np.abs(sampled.mean(0) - exact)
  assert np.all(error < 4 * standard_error), (error, standard_error)
  assert float(standard_error.max()) < 1e-3
  assert np.all(np.abs(sampled - exact).max(0) > 20 * standard_error)


def test_benchmark_loop_port_agrees_with_the_library(tmp_path, capsys):
  """experiments/bench_losses.py runs, and its loop port matches 'sampled'."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, 'experiments', 'bench_losses.py')
  spec = importlib.util.spec_from_file_location('bench_losses', path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  psi = jnp.asarray(random_psi(14))
  pairs = np.array([(0, 1), (2, 0), (1, 2), (0, 1)], np.int32)
  np.testing.assert_allclose(
      bench.loop_port_group_coherence(psi, NUM_GROUPS, pairs),
      ref.group_coherence(psi, NUM_GROUPS, pairs=[tuple(p) for p in pairs]), **TOL)
  out = tmp_path / 'bench.json'
  assert bench.main(['--batch', '2', '--size', '3', '--channels', '6', '--groups', '2',
                     '--repeats', '2', '--json', str(out)]) == 0
  results = json.loads(out.read_text())['results']
  assert sorted(results) == ['exact', 'loop', 'sampled']
  assert abs(results['loop']['value'] - results['sampled']['value']) < 1e-5
  assert 'loop/sampled = ' in capsys.readouterr().out
