"""Dissection measurement choices: the presets and their overrides, and a regression test with
hand-built ideal units whose labels under each upsampling are known."""
import functools
import json
import os
import runpy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cgl_jax import checkpoints, models
from cgl_jax import dissect as dissect_lib
from cgl_jax.data import broden, shapes
from cgl_jax.dissect import measurement, reference, report, tally

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _settings(**fields):
  settings = ml_collections.ConfigDict({'measurement': 'netdissect_lite', 'upsampling': None,
                                        'image_format': None, 'probe_split': None,
                                        'iou_thresholds': None, 'categories': None})
  settings.update(fields)
  return settings


def test_presets_set_every_field():
  assert measurement.resolve(_settings()) == {
      'preset': 'netdissect_lite', 'upsampling': 'bilinear', 'image_format': 'png',
      'probe_split': 'validation', 'iou_thresholds': [0.04], 'categories': None}
  assert measurement.resolve(_settings(measurement='authors_synthetic')) == {
      'preset': 'authors_synthetic', 'upsampling': 'nearest', 'image_format': 'jpeg',
      'probe_split': 'all', 'iou_thresholds': [0.08, 0.04], 'categories': None}
  assert measurement.resolve(_settings(measurement='authors_synthetic_pillow7'))[
      'upsampling'] == 'bicubic'


def test_fields_override_the_preset():
  chosen = measurement.resolve(_settings(measurement='authors_synthetic', upsampling='bilinear',
                                         iou_thresholds=(0.04,), categories=('color', 'shape')))
  assert chosen == {'preset': 'authors_synthetic', 'upsampling': 'bilinear',
                    'image_format': 'jpeg', 'probe_split': 'all', 'iou_thresholds': [0.04],
                    'categories': ['color', 'shape']}


@pytest.mark.parametrize('fields,message', [
    (dict(measurement='authors'), "config.dissect.measurement must be one of ('netdissect_lite', "
                                  "'authors_synthetic', 'authors_synthetic_pillow7'); got "
                                  "'authors'"),
    (dict(upsampling='area'), "config.dissect.upsampling must be one of ('bilinear', 'nearest', "
                              "'bicubic') (or None: the 'netdissect_lite' preset's 'bilinear'); "
                              "got 'area'"),
    (dict(image_format='gif'), "config.dissect.image_format must be one of ('png', 'jpeg')"),
    (dict(probe_split='train'), "config.dissect.probe_split must be one of ('validation', 'all')"),
    (dict(iou_thresholds=(0.0,)), 'config.dissect.iou_thresholds must be non-empty values in '
                                  '(0, 1]; got (0.0,)'),
    (dict(categories=()), 'config.dissect.categories must be a non-empty sequence'),
])
def test_bad_fields_are_named(fields, message):
  with pytest.raises(ValueError) as error:
    measurement.resolve(_settings(**fields))
  assert message in str(error.value)


# ----------------------------------------------------------------------------------------------
# Ideal units.

_KERNEL, _STRIDE = 7, 2  # conv2 of ShapesCNN at 64 px: stride 2, an 8-px receptive field


def _ideal_unit_maps(masks):
  """Unit u's map: the fraction of concept u's pixels in the 7×7 window around each position,
  sampled with stride 2 — what a perfect concept detector at conv2 (32×32 maps) would fire.
  masks: bool [N, 64, 64, U] → float32 [N, 32, 32, U]."""
  pad = (_KERNEL - 1) // 2
  padded = np.pad(masks.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  sums = np.pad(padded.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0), (0, 0)))
  k = _KERNEL
  window = sums[:, k:, k:] - sums[:, :-k, k:] - sums[:, k:, :-k] + sums[:, :-k, :-k]
  return (window / k ** 2)[:, ::_STRIDE, ::_STRIDE].astype(np.float32)


@pytest.fixture(scope='module')
def ideal_units():
  examples = shapes.generate('validation', images_per_class=20)  # 180 images
  maps = _ideal_unit_maps(shapes.concept_masks(examples.color_map, examples.shape_map))
  label_maps = shapes.concept_label_maps(examples.color_map, examples.shape_map)
  pixel = np.stack([label_maps[c] for c in shapes.CATEGORIES], axis=1).astype(np.int32)
  primary = np.array([-1] + [shapes.CATEGORIES.index(c) for _, c in shapes.CONCEPTS])
  thresholds = reference.thresholds(np.moveaxis(maps, 3, 1), 0.005)
  return maps, pixel, primary, thresholds


def _labels(ideal_units, method):
  maps, pixel, primary, thresholds = ideal_units
  onehot = tally.category_onehot(primary, len(shapes.CATEGORIES))
  step = jax.jit(functools.partial(tally.tally_batch, category_onehot=jnp.asarray(onehot),
                                   images_per_step=6, upsampling=method))
  counts = step(maps, thresholds, pixel, np.zeros((len(maps), 1), np.int32),
                np.ones(len(maps), bool))
  concepts = tally.unit_concepts(tally.iou(tally.TallyCounts(*map(np.asarray, counts)), primary),
                                 primary, len(shapes.CATEGORIES))
  names = ('',) + tuple(name for name, _ in shapes.CONCEPTS)
  return ({unit: names[label] for (unit, _), label in zip(shapes.CONCEPTS, concepts.label)},
          concepts)


@pytest.mark.parametrize('method', tally.UPSAMPLING)
def test_ideal_units_get_the_labels_each_upsampling_gives_them(ideal_units, method):
  """A colour unit's top 0.5 % of activations lie inside squares (a 7×7 window fits inside a
  12×12 square more often than inside a circle or triangle), so its IoUs with 'red' and
  'red_square' differ by a few hundredths and the upsampling decides between them: bilinear
  (NetDissect-Lite) calls it a colour-square detector, nearest and bicubic (the CGL authors'
  PIL default, before and after Pillow 7) a colour detector. The ideal square unit saturates on
  more than 0.5 % of positions, so its threshold is its maximum and nothing exceeds it: no
  match (label 0, the last category, as the reference writes it)."""
  labels, concepts = _labels(ideal_units, method)
  colour_label = {'bilinear': '{}_square', 'nearest': '{}', 'bicubic': '{}'}[method]
  expected = {colour: colour_label.format(colour) for colour in shapes.COLORS}
  expected.update(square='', circle='circle', triangle='triangle')
  expected.update({item: item for item in shapes.ITEMS})
  assert labels == expected
  square = [name for name, _ in shapes.CONCEPTS].index('square')
  assert concepts.score[square] == 0
  assert concepts.category[square] == len(shapes.CATEGORIES) - 1
  # The colour-vs-colour-square margin is small, as measured on trained units.
  colour = [name for name, _ in shapes.CONCEPTS].index('red')
  margin = abs(concepts.category_iou[colour, 0] - concepts.category_iou[colour, 2])
  assert 0.005 < margin < 0.06


# ----------------------------------------------------------------------------------------------
# The preset end to end: run(config) exports, probes and records what it measured.


def test_run_measures_as_the_preset_says_and_records_it(tmp_path, monkeypatch):
  config = runpy.run_path(os.path.join(REPO_ROOT, 'configs', 'default.py'))['get_config']()
  config.dataset.name = 'cgl_shapes/binary_tiny'  # 10 images per item pair: 450 in all
  config.dataset.data_dir = str(tmp_path / 'data')
  config.dissect.measurement = 'authors_synthetic'
  config.dissect.iou_thresholds = (0.08,)
  config.dissect.categories = ('color', 'shape')
  config.dissect.layers = ('conv1',)
  config.dissect.batch_size = 50
  config.dissect.top_images = 1
  config.cgl.num_groups = 1
  model = models.create('shapes_cnn', num_classes=2, widths=(3, 3))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  monkeypatch.setattr(checkpoints, 'restore_model',
                      lambda cfg, workdir, step=None: (model, variables, 5))
  outdir = dissect_lib.run(config, str(tmp_path / 'run'))
  summary = json.load(open(os.path.join(outdir, 'summary.json')))
  assert summary['measurement'] == {
      'preset': 'authors_synthetic', 'upsampling': 'nearest', 'image_format': 'jpeg',
      'probe_split': 'all', 'iou_thresholds': [0.08], 'categories': ['color', 'shape']}
  assert summary['num_images'] == 450 and summary['categories'] == ['color', 'shape']
  assert summary['probe_set'].endswith('_jpeg95')
  assert sorted(os.listdir(os.path.join(summary['probe_set'], 'images')))[0] == '000000.jpg'
  with open(os.path.join(outdir, 'conv1', 'tally.csv')) as f:
    header = f.readline().strip().split(',')
  assert [c for c in header if c.endswith('-iou')] == ['color-iou', 'shape-iou']


@pytest.mark.parametrize('which,best,expected', [('latest', 3, None), ('best', 3, 3),
                                                 ('best', None, 'error')])
def test_run_dissects_the_checkpoint_config_dissect_checkpoint_names(tmp_path, monkeypatch, which,
                                                                     best, expected):
  colour = np.zeros((4, 8, 8), np.int32)
  colour[:, :4] = 1
  directory = broden.write_broden(str(tmp_path / 'probe'), images=np.zeros((4, 8, 8, 3), np.uint8),
                                  concepts=[('red', 'color')], pixel_labels={'color': colour})
  config = runpy.run_path(os.path.join(REPO_ROOT, 'configs', 'default.py'))['get_config']()
  config.dissect.broden_dir = directory
  config.dissect.checkpoint = which
  config.dissect.layers = ('conv1',)
  config.dissect.batch_size = 4
  config.dissect.top_images = 1
  config.dataset.image_size = 8
  config.cgl.num_groups = 1
  model = models.create('shapes_cnn', num_classes=2, widths=(3, 3))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
  asked = []
  monkeypatch.setattr(checkpoints, 'best_step', lambda workdir: best)
  monkeypatch.setattr(checkpoints, 'restore_model', lambda cfg, workdir, step=None: (
      asked.append(step) or (model, variables, 9 if step is None else step)))
  if expected == 'error':
    with pytest.raises(FileNotFoundError, match="config.dissect.checkpoint='best', but no kept "
                                                'checkpoint .* was saved with validation metrics'):
      dissect_lib.run(config, str(tmp_path / 'run'))
    return
  outdir = dissect_lib.run(config, str(tmp_path / 'run'))
  assert asked == [expected]
  assert outdir.endswith(f'step_{9 if expected is None else expected}')


def test_tally_csv_row_of_a_unit_without_matches_is_the_references():
  """NetDissect-Lite writes, for a category whose best label is 0: label '' (label 0's name),
  truth tally_labels[0] = 0, intersect 0, IoU 0 and activation units_cat of label 0's primary
  category, the last one. The unit itself: label '', the last category, score 0."""
  primary = np.array([-1, 0, 1, 2])
  counts = tally.TallyCounts(labels=np.array([0, 10, 20, 30]), units=np.array([7]),
                             units_cat=np.array([[2, 5, 7]]), both=np.zeros((1, 4), np.int64))
  concepts = tally.unit_concepts(tally.iou(counts, primary), primary, 3)
  (row,) = report.tally_rows(concepts, counts, categories=('a', 'b', 'c'),
                             label_names=('', 'x', 'y', 'z'))
  assert (row['label'], row['category'], row['score']) == ('', 'c', 0.0)
  for category in 'abc':
    assert (row[f'{category}-label'], row[f'{category}-truth'], row[f'{category}-intersect'],
            row[f'{category}-iou'], row[f'{category}-activation']) == ('', 0, 0, 0.0, 7)
