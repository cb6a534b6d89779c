"""dissect.multirun: R runs dissected together equal R single-run dissections, exactly."""
import dataclasses

import jax
import numpy as np
import pytest

from cgl_jax import dissect, models
from cgl_jax.data import broden, shapes
from cgl_jax.dissect import multirun as dissect_multirun

SIZE = 16
SETTINGS = dissect.DissectionSettings(
    layers=('conv2', 'conv1'), mean=(127.5,) * 3, std=(64.0,) * 3, quantile=0.02,
    iou_thresholds=(0.04, 0.08), batch_size=16, image_size=SIZE, top_images=3, num_groups=2)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  directory = shapes.export_broden(str(tmp_path_factory.mktemp('probe') / 'broden'),
                                   split='validation', images_per_class=2, train_fraction=0.5)
  data = broden.Broden(directory)
  model = models.create('shapes_cnn', num_classes=2, widths=(4, 6))
  runs = [model.init(jax.random.key(seed), np.zeros((1, SIZE, SIZE, 3)), train=False)
          for seed in (0, 1, 2)]
  return data, model, runs


def _assert_same(together, alone):
  assert list(together.layers) == list(alone.layers) == ['conv1', 'conv2']
  for name, layer in alone.layers.items():
    other = together.layers[name]
    np.testing.assert_array_equal(other.thresholds, layer.thresholds)
    for mine, theirs in zip(other.counts, layer.counts):
      np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(other.top_images, layer.top_images)
    np.testing.assert_array_equal(other.top_maps, layer.top_maps)
    for field in dataclasses.fields(layer.concepts):
      np.testing.assert_array_equal(getattr(other.concepts, field.name),
                                    getattr(layer.concepts, field.name))
    assert other.detectors == layer.detectors
    assert other.groups == layer.groups
  assert together.rud == alone.rud


@pytest.mark.parametrize('run_axis', ['unroll', 'map'])
def test_runs_dissected_together_equal_single_runs(setup, run_axis):
  data, model, runs = setup
  together = dissect_multirun.compute_runs(
      model, dissect_multirun.stack_variables(runs), data, SETTINGS, run_axis=run_axis,
      show_progress=False)
  assert len(together) == 3
  for result, variables in zip(together, runs):
    _assert_same(result, dissect.compute(model, variables, data, SETTINGS, show_progress=False))
  # The runs differ, so the split picks each run's own units.
  assert not np.array_equal(together[0].layers['conv1'].thresholds,
                            together[1].layers['conv1'].thresholds)


def test_vmap_agrees_to_rounding(setup):
  data, model, runs = setup
  mapped = dissect_multirun.compute_runs(model, dissect_multirun.stack_variables(runs[:2]), data,
                                         SETTINGS, run_axis='map', show_progress=False)
  vmapped = dissect_multirun.compute_runs(model, dissect_multirun.stack_variables(runs[:2]),
                                          data, SETTINGS, run_axis='vmap', show_progress=False)
  for a, b in zip(mapped, vmapped):
    for name in a.layers:
      np.testing.assert_allclose(a.layers[name].thresholds, b.layers[name].thresholds,
                                 rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(setup):
  data, model, runs = setup
  with pytest.raises(ValueError, match='run_axis must be one of'):
    dissect_multirun.StackedRuns(model, 2, 'loop')
  ragged = dissect_multirun.stack_variables(runs[:2])
  ragged['params']['conv1']['bias'] = ragged['params']['conv1']['bias'][:1]
  with pytest.raises(ValueError, match='leading run axis'):
    dissect_multirun.compute_runs(model, ragged, data, SETTINGS, show_progress=False)
