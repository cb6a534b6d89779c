"""cgl_jax.regularize against independent numpy implementations of method.md's formulas."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cgl_jax import kernels, models, regularize
from cgl_jax.models.layers import ConvLayer

_RNG = np.random.default_rng(0)


def _cgl_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      layers=('conv1', 'conv2'), num_groups=3, pairs='exact', num_pairs=None,
      reduction='per_sample', lambda_bn=1.0, lambda_g=1.0, lambda_s=1.0, lambda_o=0.0,
      learn_p=False, p1=1.0, p2=0.0, bn_mask='paper'))
  config.update(overrides)
  return config


# --- numpy references (method.md, written out loop by loop) -------------------------------------


def _ref_soft_masks(a, p1=1.0, p2=0.0):
  std = a.reshape(-1, a.shape[-1]).std(axis=0, ddof=1)
  return 1 / (1 + np.exp(-(p1 * a / (std + 5e-3) + p2)))


def _ref_group_coherence_sum(psi, groups):
  """Σ_g mean over ordered pairs i != j and images of D (per-sample reduction)."""
  f = psi.shape[-1] // groups
  total = 0.0
  for g in range(groups):
    distances = []
    for i, j in itertools.permutations(range(g * f, (g + 1) * f), 2):
      for b in range(psi.shape[0]):
        p, q = psi[b, ..., i], psi[b, ..., j]
        diff = np.abs(p - q).sum()
        distances.append(2 * diff / (p.sum() + q.sum() + diff))
    total += np.mean(distances)
  return total


def _ref_spatial_concentration(psi):
  values = []
  for b, c in itertools.product(range(psi.shape[0]), range(psi.shape[-1])):
    m = psi[b, ..., c]
    ys, xs = np.meshgrid(np.arange(m.shape[0]), np.arange(m.shape[1]), indexing='ij')
    mass = m.sum() + 1e-4
    cy, cx = (ys * m).sum() / mass, (xs * m).sum() / mass
    values.append((m * np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)).sum() / mass)
  return np.mean(values)


def _ref_block_norm(kernel, groups):
  f = kernel.shape[-1] // groups
  return sum(np.sqrt((kernel[..., g * f:(g + 1) * f] ** 2).sum()) for g in range(groups))


def _ref_orthogonality(kernel):
  w = kernel.reshape(-1, kernel.shape[-1]).T
  return np.sqrt(((w @ w.T - np.eye(w.shape[0])) ** 2).sum())


# --- a tiny ShapesCNN with free filters (widths 7 and 11 with G = 3 leave 1 and 2 free) ------------


@pytest.fixture(scope='module')
def shapes_forward():
  model = models.create('shapes_cnn', num_classes=2, widths=(7, 11))
  images = jnp.asarray(_RNG.normal(size=(3, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  _, state = model.apply(variables, images, train=True, mutable=['intermediates'])
  sown = models.get_intermediates(state)
  return model, variables['params'], sown


def test_terms_match_numpy_reference(shapes_forward):
  model, params, sown = shapes_forward
  config = _cgl_config(lambda_o=1.0)
  terms = regularize.cgl_terms(config, params=params, intermediates=sown,
                               conv_layers=model.conv_layers(), key=jax.random.key(0))
  assert list(terms) == ['r_bn', 'l_g', 'l_s', 'r_orth']
  kernels = [np.asarray(params[name]['kernel'], np.float64) for name in ('conv1', 'conv2')]
  psis = [_ref_soft_masks(np.asarray(sown[name], np.float64)) for name in ('conv1', 'conv2')]
  np.testing.assert_allclose(terms['r_bn'], sum(_ref_block_norm(k, 3) for k in kernels),
                             rtol=1e-5)
  np.testing.assert_allclose(terms['r_orth'], sum(_ref_orthogonality(k) for k in kernels),
                             rtol=1e-5)
  # Network L_g and L_s are MEANS over the regularised layers.
  np.testing.assert_allclose(terms['l_g'],
                             np.mean([_ref_group_coherence_sum(p, 3) for p in psis]), rtol=1e-5)
  np.testing.assert_allclose(terms['l_s'],
                             np.mean([_ref_spatial_concentration(p) for p in psis]), rtol=1e-5)


def test_only_active_terms_and_weighted_sum(shapes_forward):
  model, params, sown = shapes_forward
  config = _cgl_config(lambda_bn=0.5, lambda_g=0.0, lambda_s=2.0)
  assert regularize.active_terms(config) == ('r_bn', 'l_s')
  assert regularize.needs_intermediates(config)
  assert not regularize.needs_intermediates(_cgl_config(lambda_g=0.0, lambda_s=0.0))
  terms = regularize.cgl_terms(config, params=params, intermediates=sown,
                               conv_layers=model.conv_layers(), key=jax.random.key(0))
  assert set(terms) == {'r_bn', 'l_s'}
  np.testing.assert_allclose(regularize.weighted_sum(config, terms),
                             0.5 * terms['r_bn'] + 2.0 * terms['l_s'], rtol=1e-6)
  assert float(regularize.weighted_sum(config, {})) == 0.0
  # The R_bn-only configuration never touches the activations.
  rbn_only = _cgl_config(lambda_g=0.0, lambda_s=0.0)
  assert list(regularize.cgl_terms(rbn_only, params=params, intermediates={},
                                   conv_layers=model.conv_layers(),
                                   key=jax.random.key(0))) == ['r_bn']


def test_sampled_pairs_follow_the_key_and_average_to_exact(shapes_forward):
  model, params, sown = shapes_forward
  def l_g(key, **overrides):
    # G = 2: f = 5 filters per group, 20 ordered pairs (f = 3 gives few distinct pair sets).
    config = _cgl_config(lambda_bn=0.0, lambda_s=0.0, layers=('conv2',), num_groups=2,
                         **overrides)
    return float(regularize.cgl_terms(config, params=params, intermediates=sown,
                                      conv_layers=model.conv_layers(), key=key)['l_g'])
  key = jax.random.key(1)
  assert l_g(key, pairs='sampled') == l_g(key, pairs='sampled')
  assert l_g(key, pairs='sampled') != l_g(jax.random.key(2), pairs='sampled')
  np.testing.assert_allclose(l_g(key, pairs='sampled', num_pairs=20_000), l_g(key), rtol=1e-2)


def test_learned_p_overrides_config_and_gets_gradient(shapes_forward):
  model, params, sown = shapes_forward
  config = _cgl_config(lambda_bn=0.0, lambda_g=0.0, layers=('conv2',), learn_p=True)
  p = regularize.init_soft_mask_params(config)
  assert set(p) == {'p1', 'p2'} and float(p['p1']) == 1.0 and float(p['p2']) == 0.0
  assert regularize.init_soft_mask_params(_cgl_config()) == {}
  def l_s(soft_mask_params):
    return regularize.cgl_terms(config, params=params, intermediates=sown,
                                conv_layers=model.conv_layers(), key=jax.random.key(0),
                                soft_mask_params=soft_mask_params)['l_s']
  learned = {'p1': jnp.float32(2.0), 'p2': jnp.float32(-0.5)}
  expected = _ref_spatial_concentration(
      _ref_soft_masks(np.asarray(sown['conv2'], np.float64), p1=2.0, p2=-0.5))
  np.testing.assert_allclose(l_s(learned), expected, rtol=1e-5)
  grads = jax.grad(l_s)(learned)
  assert float(grads['p1']) != 0.0 and float(grads['p2']) != 0.0


def _nested(leaves_by_path):
  tree = {}
  for path, value in leaves_by_path.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


@pytest.mark.parametrize('bn_mask', ['paper', 'code'])
def test_batch_norm_masks_divide_by_gamma_or_running_var(bn_mask):
  layer = ConvLayer.create('conv1', features=6, batch_norm=True)
  bn_out = _RNG.normal(size=(2, 5, 5, 6)).astype(np.float32)
  gamma = np.linspace(0.5, 2.0, 6).astype(np.float32)
  var = np.linspace(3.0, 0.2, 6).astype(np.float32)
  # Laid out where the model puts them: γ at bn_scale_path, the running var beside it.
  params = _nested({layer.kernel_path: np.ones((3, 3, 3, 6), np.float32),
                    layer.bn_scale_path: gamma})
  batch_stats = _nested({(*layer.bn_scale_path[:-1], 'var'): var})
  config = _cgl_config(layers=('conv1',), lambda_bn=0.0, lambda_g=0.0, bn_mask=bn_mask)
  terms = regularize.cgl_terms(config, params=params, intermediates={'conv1': bn_out},
                               conv_layers=(layer,), key=jax.random.key(0),
                               batch_stats=batch_stats)
  divisor = gamma if bn_mask == 'paper' else var
  psi = 1 / (1 + np.exp(-bn_out.astype(np.float64) / divisor))
  np.testing.assert_allclose(terms['l_s'], _ref_spatial_concentration(psi), rtol=1e-5)


def test_missing_sown_layer_is_named(shapes_forward):
  model, params, sown = shapes_forward
  with pytest.raises(KeyError, match=r"names 'conv2', but the model sowed only \['conv1'\]"):
    regularize.cgl_terms(_cgl_config(layers=('conv2',)), params=params,
                         intermediates={'conv1': sown['conv1']},
                         conv_layers=model.conv_layers(), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"unknown CGL terms \['l_x'\]"):
    regularize.cgl_terms(_cgl_config(), params=params, intermediates=sown,
                         conv_layers=model.conv_layers(), key=jax.random.key(0),
                         terms=('l_x',))


def test_resolve_kernels_names_and_logs_the_choice(caplog):
  auto = kernels.select('cpu', num_devices=1, dtype=jnp.float32)
  with caplog.at_level('INFO'):
    resolved = regularize.resolve_kernels(_cgl_config(kernels='auto'), platform='cpu',
                                          num_devices=1)
  assert (resolved.pair_sums_name, resolved.per_map_name) == (auto.pair_sums, auto.per_map)
  assert resolved.pair_sums is kernels.pair_sums(auto.pair_sums)
  assert (f'L_g pair sums: {auto.pair_sums} on cpu; L_s per-map: {auto.per_map}'
          in caplog.text)
  several = regularize.resolve_kernels(_cgl_config(kernels='auto'), platform='cpu',
                                       num_devices=8)
  assert (several.pair_sums_name, several.per_map_name) == ('loop', 'jnp')
  tpu = regularize.resolve_kernels(_cgl_config(), platform='tpu', num_devices=4)  # no field
  assert (tpu.pair_sums_name, tpu.per_map_name) == ('matmul', 'jnp')
  named = regularize.resolve_kernels(_cgl_config(kernels='matmul'))
  assert named.pair_sums is kernels.pair_sums('matmul') and named.per_map_name == 'jnp'
  with pytest.raises(ValueError, match="unknown kernel implementation 'fast'"):
    regularize.resolve_kernels(_cgl_config(kernels='fast'))


@pytest.mark.parametrize('name', kernels.PAIR_SUMS)
def test_terms_are_the_same_with_every_kernel(shapes_forward, name):
  if not kernels.available(name):
    pytest.skip(f'{name!r} is not available here')
  model, params, sown = shapes_forward
  layers = model.conv_layers()
  config = _cgl_config(pairs='sampled', layers=('conv2',), num_groups=2, kernels=name)
  resolved = (regularize.resolve_kernels(config) if name != 'pallas' else regularize.Kernels(
      'pallas', 'jnp', kernels.pair_sums('pallas', interpret=True), kernels.per_map('jnp')))

  def terms(kernels_to_use):
    return jax.jit(jax.value_and_grad(lambda s: regularize.weighted_sum(
        config, regularize.cgl_terms(config, params=params, intermediates=s, conv_layers=layers,
                                     key=jax.random.key(3), kernels=kernels_to_use))))(sown)

  want_value, want_grad = terms(None)
  got_value, got_grad = terms(resolved)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-6)
  for name_of_layer in want_grad:
    np.testing.assert_allclose(got_grad[name_of_layer], want_grad[name_of_layer], rtol=1e-4,
                               atol=1e-7)
