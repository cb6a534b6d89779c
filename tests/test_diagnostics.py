"""diagnostics: dead units, background share, group norms and mask statistics on analytic cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax import default_config, diagnostics, losses, models


def test_dead_units_are_never_positive():
  maps = np.full((3, 2, 2, 2), -1.0)
  maps[1, 0, 1, 1] = 1e-3  # one positive position suffices
  maps[0, 0] = 0.0  # zero everywhere: ReLU silences it too
  np.testing.assert_array_equal(diagnostics.dead_units(maps), [True, False, True])
  with pytest.raises(ValueError, match=r'\[C, k >= 1, h, w\]'):
    diagnostics.dead_units(np.zeros((3, 4)))


def test_background_share_counts_the_pixels_off_the_objects():
  units = np.array([10, 0, 4])
  both = np.array([[0, 3, 2, 9], [0, 0, 0, 0], [0, 4, 0, 0]])  # label 3 overlaps the objects
  share = diagnostics.background_share(units, both, object_labels=[1, 2])
  np.testing.assert_allclose(share, [0.5, np.nan, 0.0])
  with pytest.raises(ValueError, match='label ids in'):
    diagnostics.background_share(units, both, object_labels=[0])
  assert diagnostics.category_labels(np.array([-1, 0, 0, 1, 2]), 0) == [1, 2]


def test_group_norms_and_their_relative_change():
  layer = models.create('shapes_cnn', num_classes=2, widths=(4, 4)).conv_layers()[0]
  kernel = np.zeros((1, 1, 1, 4))
  kernel[..., :] = [3, 4, 0, 1]
  norms = diagnostics.group_norms({'conv1': {'kernel': kernel}}, [layer], 2)
  np.testing.assert_allclose(norms['conv1'], [5, 1], rtol=1e-6)
  assert diagnostics.relative_change(2 * norms['conv1'], norms['conv1']) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='shapes differ'):
    diagnostics.relative_change(np.ones(2), np.ones(3))


@pytest.fixture(scope='module')
def tiny():
  model = models.create('shapes_cnn', num_classes=2, widths=(3, 4))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  cgl = default_config.get_config().cgl
  cgl.layers = ('conv2',)
  cgl.num_groups = 2
  images = np.asarray(jax.random.normal(jax.random.key(1), (10, 8, 8, 3)))
  return model, variables, cgl, images


def test_identical_filters_have_group_distance_zero(tiny):
  model, variables, cgl, images = tiny
  params = jax.tree.map(np.array, variables['params'])
  kernel, bias = params['conv2']['kernel'], params['conv2']['bias']
  kernel[..., 1], kernel[..., 3] = kernel[..., 0], kernel[..., 2]
  bias[1], bias[3] = bias[0], bias[2]
  same = diagnostics.mask_statistics(model, {'params': params}, images, cgl, batch_size=4)
  assert same['group_distance'] == pytest.approx(0.0, abs=1e-7)
  other = diagnostics.mask_statistics(model, variables, images, cgl, batch_size=4)
  assert other['group_distance'] > 0.01


@pytest.mark.parametrize('jit', [True, False])
def test_mask_statistics_average_the_batches(tiny, jit):
  model, variables, cgl, images = tiny
  expected = {'group_distance': [], 'l_s': []}
  for batch in (images[:4], images[4:8]):  # the last 2 images are left out
    _, state = model.apply(variables, batch, train=False, mutable=['intermediates'])
    psi = losses.soft_masks(models.get_intermediates(state)['conv2'])
    expected['group_distance'].append(losses.group_coherence(psi, 2, pairs='exact').mean())
    expected['l_s'].append(losses.spatial_concentration(psi))
  with jax.disable_jit(not jit):
    got = diagnostics.mask_statistics(model, variables, images, cgl, batch_size=4)
  for name, values in expected.items():
    assert got[name] == pytest.approx(float(np.mean(values)), rel=1e-5)
  with pytest.raises(ValueError, match='at least batch_size=16'):
    diagnostics.mask_statistics(model, variables, images, cgl, batch_size=16)
