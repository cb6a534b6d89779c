"""End-to-end dissection with a fake model whose units are known functions of the image.

MaskNet's conv1 is a 1×1 identity conv (unit 0 = the red channel, unit 1 = the green channel,
unit 2 = blue), conv2 a 2×2 stride-2 average ×0.5 + 3 (a different resolution and different
thresholds). The probe images put R = 255 exactly on the 'red' concept and uniform noise in G.
"""
import csv
import dataclasses
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from cgl_jax import default_config
from cgl_jax import dissect as dissect_lib
from cgl_jax.data import broden
from cgl_jax.dissect import probe, reference, report, tally
from cgl_jax.models import layers as model_layers

QUANTILE = 0.02
NUM_IMAGES, SIZE = 8, 16
CONCEPTS = [('red', 'colour'), ('green', 'colour'), ('square', 'shape'), ('disk', 'shape'),
            ('indoor', 'scene')]


class MaskNet(nn.Module):
  """Two sown 'convs' following the cgl_jax.models contract."""

  def conv_layers(self):
    return (model_layers.ConvLayer.create('conv1', features=3, batch_norm=False),
            model_layers.ConvLayer.create('conv2', features=3, batch_norm=False))

  @nn.compact
  def __call__(self, x, *, train):
    x = model_layers.SownConv(3, kernel_size=1, name='conv1')(x, train=train)
    x = model_layers.SownConv(3, kernel_size=2, strides=2, name='conv2')(x, train=train)
    return jnp.mean(x, axis=(1, 2))


def mask_net_variables():
  return {'params': {
      'conv1': {'kernel': jnp.eye(3).reshape(1, 1, 3, 3), 'bias': jnp.zeros(3)},
      'conv2': {'kernel': jnp.broadcast_to(jnp.eye(3) * 0.125, (2, 2, 3, 3)),
                'bias': jnp.full(3, 3.0)}}}


def make_probe_set(directory):
  rng = np.random.default_rng(0)
  images = np.zeros((NUM_IMAGES, SIZE, SIZE, 3), np.uint8)
  images[..., 1] = rng.integers(0, 256, (NUM_IMAGES, SIZE, SIZE))  # noise in green
  colour = np.zeros((NUM_IMAGES, SIZE, SIZE), np.int32)
  shape = np.zeros((NUM_IMAGES, SIZE, SIZE), np.int32)
  for i in (1, 5):  # a red 4×4 square (32 px in all: under the top 2% of 2,048 positions)
    colour[i, 4:8, 8:12] = 1
    shape[i, 4:8, 7:12] = 3  # with a white column: 'square' is not tied with 'red'
    images[i, 4:8, 8:12, 0] = 255
  for i in range(NUM_IMAGES):  # a large green disk elsewhere in every image
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disk = (yy - 11) ** 2 + (xx - 5) ** 2 <= 12
    colour[i][disk] = 2
    shape[i][disk] = 4
  scene = [[5] if i % 2 else [] for i in range(NUM_IMAGES)]
  return broden.write_broden(directory, images=images, concepts=CONCEPTS,
                             pixel_labels={'colour': colour, 'shape': shape},
                             image_labels={'scene': scene})


SETTINGS = dissect_lib.DissectionSettings(
    layers=('conv2', 'conv1'), mean=(0, 0, 0), std=(1, 1, 1), quantile=QUANTILE,
    iou_thresholds=(0.04, 0.08), batch_size=3, image_size=SIZE, top_images=4, num_groups=3)


@pytest.fixture(scope='module')
def computed(tmp_path_factory):
  root = tmp_path_factory.mktemp('dissect')
  data = broden.Broden(make_probe_set(str(root / 'probe')))
  result = dissect_lib.compute(MaskNet(), mask_net_variables(), data, SETTINGS,
                               show_progress=False)
  return data, result, root


@pytest.fixture(scope='module')
def dissected(computed):
  data, result, root = computed
  outdir = dissect_lib.write_report(result, str(root / 'out' / 'step_7'), step=7, data=data)
  return data, outdir


def test_compute_returns_the_numbers_without_writing_anything(computed):
  data, result, root = computed
  assert sorted(os.listdir(root)) == ['probe']
  assert list(result.layers) == ['conv1', 'conv2']  # forward order
  conv1 = result.layers['conv1']
  np.testing.assert_array_equal(conv1.concepts.label[:1], [1])  # unit 0 = red (label id 1)
  assert conv1.concepts.score[0] == pytest.approx(1.0, abs=1e-9)
  assert [entry['iou_threshold'] for entry in conv1.detectors] == [0.04, 0.08]
  assert conv1.detectors[0]['detectors_per_concept'] == {'red': 1}
  assert conv1.top_images.shape == (3, 4) and conv1.top_maps.shape == (3, 4, SIZE, SIZE)
  assert list(conv1.top_images[0, :2]) == [1, 5]  # the two images with the red square
  assert [row['group'] for row in conv1.groups] == [1, 2, 3]
  assert result.rud[0] == dissect_lib.ratio_of_unique_detectors(
      list(result.layers.values()), threshold_index=0)
  assert result.rud[0]['units'] == 6


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_mask_unit_has_iou_one_and_noise_unit_is_no_detector(dissected):
  _, outdir = dissected
  rows = {int(r['unit']): r for r in _read_csv(os.path.join(outdir, 'conv1', 'tally.csv'))}
  assert rows[1]['label'] == 'red' and rows[1]['category'] == 'colour'
  assert float(rows[1]['score']) == pytest.approx(1.0, abs=1e-9)
  assert rows[1]['colour-truth'] == rows[1]['colour-intersect'] == '32'
  assert float(rows[2]['score']) < 0.04  # green noise: its top 2% hits no concept well
  # Constant blue channel: never above its threshold, so no match: as the reference, label 0
  # (an empty name) in the last category, and empty labels per category.
  assert float(rows[3]['score']) == 0
  assert rows[3]['label'] == '' and rows[3]['category'] == 'scene'
  assert rows[3]['colour-label'] == rows[3]['shape-label'] == rows[3]['scene-label'] == ''
  summary = json.load(open(os.path.join(outdir, 'conv1', 'summary.json')))
  assert summary['detectors'][0]['detectors_per_concept'] == {'red': 1}
  assert summary['detectors'][0]['unique_detectors_per_category'] == {
      'colour': 1, 'shape': 0, 'scene': 0}


def test_each_layer_has_its_own_thresholds_and_tally(dissected):
  """Thresholds = numpy.quantile of the layer's own activations; counts = the NumPy reference
  tally run on that layer's activations with those thresholds."""
  data, outdir = dissected
  images = next(data.batches(batch_size=NUM_IMAGES))['image'].astype(np.float32)
  _, state = MaskNet().apply(mask_net_variables(), images, train=False,
                             mutable=['intermediates'])
  onehot = tally.category_onehot(data.primary_category_index(), len(data.categories))
  batch = next(data.batches(batch_size=NUM_IMAGES))
  pixel, image_ids = probe.stacked_labels(batch, data.categories,
                                          segmentation_size=(SIZE, SIZE))
  thresholds = {}
  for name in ('conv1', 'conv2'):
    acts = np.asarray(state['intermediates'][name]['pre_activation'][0])
    expected = np.quantile(acts.reshape(-1, 3), 1 - QUANTILE, axis=0).astype(np.float32)
    summary = json.load(open(os.path.join(outdir, name, 'summary.json')))
    np.testing.assert_array_equal(np.float32(summary['thresholds']), expected)
    thresholds[name] = expected
    counts = reference.tally(np.moveaxis(acts, 3, 1), expected, zip(pixel, image_ids),
                             category_onehot=onehot)
    iou = tally.iou(counts, data.primary_category_index())
    rows = {int(r['unit']): r for r in _read_csv(os.path.join(outdir, name, 'tally.csv'))}
    for unit in range(3):
      for g, category in enumerate(data.categories):
        members = np.flatnonzero(data.primary_category_index() == g)
        best = members[np.argmax(iou[unit, members])]
        row = rows[unit + 1]
        assert int(row[f'{category}-intersect']) == counts.both[unit, best]
        # No match in the category (label 0): the reference writes label 0's primary
        # category's count, the last category's.
        matched = iou[unit, best] > 0
        assert int(row[f'{category}-activation']) == counts.units_cat[
            unit, g if matched else len(data.categories) - 1]
        assert float(row[f'{category}-iou']) == pytest.approx(iou[unit, best], rel=1e-12)
  assert not np.array_equal(thresholds['conv1'], thresholds['conv2'])
  # conv2 smears the 4×4 red square over 6×6 after upsampling: a detector, not a perfect one
  # (of the 4×5 'square' label, which the smeared mask overlaps more than the 4×4 red).
  conv2 = {int(r['unit']): r for r in _read_csv(os.path.join(outdir, 'conv2', 'tally.csv'))}
  assert conv2[1]['label'] == 'square' and 0.3 < float(conv2[1]['score']) < 0.9
  assert 0.3 < float(conv2[1]['colour-iou']) < float(conv2[1]['score'])


def test_outputs_layout_and_reference_columns(dissected):
  data, outdir = dissected
  for name in ('conv1', 'conv2'):
    for file in ('tally.csv', 'summary.json', 'detectors.png', 'detectors.svg'):
      assert os.path.isfile(os.path.join(outdir, name, file)), file
    with open(os.path.join(outdir, name, 'tally.csv')) as f:
      header = next(csv.reader(f))
    assert header[:4] == ['unit', 'category', 'label', 'score']
    assert header[4:9] == ['colour-label', 'colour-truth', 'colour-activation',
                           'colour-intersect', 'colour-iou']
    assert len(header) == 4 + 5 * len(data.categories)
    strip = np.asarray(Image.open(os.path.join(outdir, name, 'units', 'unit_0001.png')))
    assert strip.shape == (SIZE, 4 * SIZE + 3 * 2, 3)
  summary = json.load(open(os.path.join(outdir, 'summary.json')))
  assert summary['step'] == 7 and list(summary['layers']) == ['conv1', 'conv2']
  assert [entry['iou_threshold'] for entry in summary['rud']] == [0.04, 0.08]
  first = summary['rud'][0]
  assert first['layers'] == ['conv1', 'conv2'] and first['units'] == 6
  assert first['rud'] == first['unique_detectors'] / 6
  groups = _read_csv(os.path.join(outdir, 'concept_groups.csv'))
  assert [(g['layer'], g['group'], g['concept']) for g in groups][:1] == [('conv1', '1', 'red')]
  # β_g = ‖W_g‖_F of a one-unit group of conv1's identity kernel = 1.
  assert float(groups[0]['relevance']) == pytest.approx(1.0)
  assert not [f for f in os.listdir(os.path.dirname(outdir)) if f.startswith('.')]


def test_top_images_are_those_with_the_largest_maxima(dissected):
  data, outdir = dissected
  strip = np.asarray(Image.open(os.path.join(outdir, 'conv1', 'units', 'unit_0001.png')))
  # Unit 1 (red) peaks at images 1 and 5 (ties: the earlier image first): the red square is
  # kept as is, its border drawn in yellow, the rest dimmed to a quarter.
  first, second, image = strip[:, :SIZE], strip[:, SIZE + 2:2 * SIZE + 2], data.load_image(1)
  np.testing.assert_array_equal(first[5:7, 9:11], image[5:7, 9:11])
  assert tuple(first[4, 8]) == (255, 220, 0)
  np.testing.assert_array_equal(first[12:, :4], (image[12:, :4] * 0.25).astype(np.uint8))
  np.testing.assert_array_equal(second[5:7, 9:11], data.load_image(5)[5:7, 9:11])


def test_html_report_is_self_contained_and_sortable(dissected):
  _, outdir = dissected
  page = open(os.path.join(outdir, 'report.html')).read()
  assert 'http://' not in page and 'https://' not in page
  assert 'class="sortable"' in page and 'addEventListener' in page
  for link in ('conv1/tally.csv', 'conv2/detectors.png', 'conv1/units/unit_0001.png',
               'concept_groups.png'):
    assert f'"{link}"' in page
    assert os.path.isfile(os.path.join(outdir, link))


@pytest.mark.skipif(not os.path.exists('/usr/bin/chromium'),
                    reason='headless Chromium (Debian package chromium) is not installed')
def test_html_report_renders_in_headless_chromium(dissected, tmp_path):
  _, outdir = dissected
  screenshot = tmp_path / 'report.png'
  subprocess.run(
      ['/usr/bin/chromium', '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
       '--no-first-run', '--disable-background-networking', '--disable-component-update',
       '--disable-sync', f'--user-data-dir={tmp_path / "profile"}',
       f'--screenshot={screenshot}', '--window-size=1200,900',
       'file://' + os.path.join(outdir, 'report.html')],
      check=True, capture_output=True, timeout=120)
  pixels = np.asarray(Image.open(screenshot).convert('L'), np.float32)
  assert pixels.shape == (900, 1200)
  assert pixels.std() > 10  # text, tables and graphs, not a blank page


def test_failed_report_leaves_the_previous_step_folder(computed, tmp_path, monkeypatch):
  data, result, _ = computed
  target = str(tmp_path / 'step_1')
  os.makedirs(target)
  open(os.path.join(target, 'stale.txt'), 'w').write('old')
  written = []

  def failing_save_png(path, array):
    if len(written) == 2:
      raise OSError('disk full')
    written.append(path)
    Image.fromarray(array).save(path)

  monkeypatch.setattr(report, 'save_png', failing_save_png)
  with pytest.raises(OSError, match='disk full'):
    dissect_lib.write_report(result, target, step=1, data=data)
  assert os.listdir(target) == ['stale.txt'] and os.listdir(tmp_path) == ['step_1']
  monkeypatch.undo()
  dissect_lib.write_report(result, target, step=1, data=data)
  assert 'stale.txt' not in os.listdir(target) and os.listdir(tmp_path) == ['step_1']
  assert json.load(open(os.path.join(target, 'summary.json')))['step'] == 1


def test_image_strips_use_the_settings_upsampling():
  """A 2×2 map on an 8×8 image (outside dimmed to black): 'nearest' keeps exactly the 4×4 block
  of the one hot cell, 'bilinear' spreads it (PIL's filters, as the tally's)."""
  image = np.full((8, 8, 3), 200, np.uint8)
  feature_map = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
  kept = {method: np.any(report.highlight(image, feature_map, 0.3, upsampling=method,
                                          dim=0.0) != 0, axis=-1)
          for method in ('nearest', 'bilinear')}
  expected = np.zeros((8, 8), bool)
  expected[:4, :4] = True
  np.testing.assert_array_equal(kept['nearest'], expected)
  resized = np.asarray(Image.fromarray(feature_map, mode='F').resize((8, 8), Image.BILINEAR))
  np.testing.assert_array_equal(kept['bilinear'], resized > 0.3)
  assert kept['bilinear'].sum() != expected.sum()
  with pytest.raises(ValueError, match="upsampling must be one of .*; got 'lanczos'"):
    report.highlight(image, feature_map, 0.3, upsampling='lanczos')


def test_unknown_layer_is_named(computed):
  data, _, _ = computed
  settings = dissect_lib.DissectionSettings(layers=('conv9',), mean=(0, 0, 0), std=(1, 1, 1),
                                            image_size=SIZE)
  with pytest.raises(ValueError, match=r"\['conv9'\] are not conv layers of MaskNet"):
    dissect_lib.compute(MaskNet(), mask_net_variables(), data, settings, show_progress=False)


@pytest.mark.parametrize('cache', ['none', 'device'])
def test_probe_cache_gives_the_streamed_results(computed, cache, monkeypatch):
  """Both choices give the default's numbers; 'device' reads the files once, not once per
  pass."""
  data, result, _ = computed
  reads = []
  original = broden.Broden.batches
  monkeypatch.setattr(broden.Broden, 'batches',
                      lambda self, **kwargs: reads.append(1) or original(self, **kwargs))
  settings = dataclasses.replace(SETTINGS, probe_cache=cache)
  probed = probe.dissect_layers(MaskNet(), mask_net_variables(), data, settings,
                                show_progress=False)
  passes = 3  # two exact-quantile passes and the tally
  assert len(reads) == (1 if cache == 'device' else passes)
  for name, layer in probed.items():
    expected = result.layers[name]
    np.testing.assert_array_equal(layer.thresholds, expected.thresholds)
    np.testing.assert_array_equal(layer.counts.both, expected.counts.both)
    np.testing.assert_array_equal(layer.counts.units, expected.counts.units)
    np.testing.assert_array_equal(layer.top_indices, expected.top_images)


@pytest.mark.parametrize('backend, budget_margin, expected_reads', [
    ('gpu', 0, 1), ('gpu', -1, 3), ('cpu', 0, 3)])
def test_probe_cache_auto_follows_platform_and_size(computed, monkeypatch, backend,
                                                    budget_margin, expected_reads):
  data, _, _ = computed
  size = probe.probe_set_bytes(data, batch_size=SETTINGS.batch_size, image_size=SIZE,
                               categories=data.categories)
  # 3 batches of 3 images: 16·16·3 image bytes + int32 labels (2 pixel layers of the segmentation
  # size, 1 image-label column, 1 row index) + 1 validity byte each.
  seg_h, seg_w = data.segmentation_size()
  assert size == 9 * (SIZE * SIZE * 3 + 4 * (2 * seg_h * seg_w + 1 + 1) + 1)
  reads = []
  original = broden.Broden.batches
  monkeypatch.setattr(broden.Broden, 'batches',
                      lambda self, **kwargs: reads.append(1) or original(self, **kwargs))
  monkeypatch.setattr(probe, 'DEVICE_CACHE_BYTES', size + budget_margin)
  monkeypatch.setattr(probe.jax, 'default_backend', lambda: backend)
  probe.dissect_layers(MaskNet(), mask_net_variables(), data, SETTINGS, show_progress=False)
  assert len(reads) == expected_reads  # 1: cached on an accelerator within budget; 3: streamed


@pytest.mark.parametrize('kwargs, message', [
    (dict(probe_cache='gpu'),
     r"probe_cache must be one of \('auto', 'none', 'device'\); got 'gpu'"),
    (dict(iou_thresholds=()), 'iou_thresholds must be non-empty'),
    (dict(iou_thresholds=(0.04, 1.5)), r'values in \(0, 1\]; got \(0.04, 1.5\)'),
    (dict(batch_size=0), 'config.dissect.batch_size must be a positive integer, got 0'),
    (dict(top_images=2.5), 'config.dissect.top_images must be a positive integer, got 2.5'),
    (dict(layers=()), 'config.dissect.layers is empty'),
])
def test_bad_settings_are_named(kwargs, message):
  arguments = dict(layers=('conv1',), mean=(0, 0, 0), std=(1, 1, 1), image_size=SIZE) | kwargs
  with pytest.raises(ValueError, match=message):
    dissect_lib.DissectionSettings(**arguments)


def test_run_reads_the_config_and_restores_the_checkpoint(dissected, tmp_path, monkeypatch):
  """run(config, workdir) wiring: checkpoint restore, normalisation, Broden dir, step folder."""
  data, _ = dissected
  from cgl_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  config.dissect.broden_dir = data.directory
  config.dissect.layers = ('conv1',)
  config.dissect.quantile = QUANTILE
  config.dissect.batch_size = 4
  config.dissect.top_images = 2
  config.dataset.image_size = SIZE
  config.dataset.mean = (0.0, 0.0, 0.0)
  config.dataset.std = (2.0, 2.0, 2.0)  # halves the activations: same masks, same labels
  config.cgl.num_groups = 1
  restored = []
  monkeypatch.setattr(checkpoints, 'restore_model',
                      lambda cfg, workdir, step=None: restored.append(step) or (
                          MaskNet(), mask_net_variables(), 42))
  outdir = dissect_lib.run(config, str(tmp_path))
  assert restored == [None] and outdir == str(tmp_path / 'dissect' / 'step_42')
  rows = _read_csv(os.path.join(outdir, 'conv1', 'tally.csv'))
  assert rows[0]['unit'] == '1' and rows[0]['label'] == 'red'
