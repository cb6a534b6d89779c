"""Tests of the synthetic shapes generator (cgl_jax/data/shapes.py)."""
import hashlib
import itertools
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cgl_jax.data import broden
from cgl_jax.data import shapes

TINY = dict(images_per_class=10, train_fraction=0.8)  # 360 train / 90 validation


@pytest.fixture(scope='module')
def tiny_train():
  return shapes.generate('train', setting='classes45', seed=3, **TINY)


def _digest(examples: shapes.Examples) -> str:
  h = hashlib.sha256()
  for array in (examples.images, examples.labels, examples.color_map,
                examples.shape_map):
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------
# Determinism.


def test_same_seed_same_bytes_different_seed_different_images():
  first = shapes.generate('validation', seed=7, **TINY)
  second = shapes.generate('validation', seed=7, **TINY)
  other = shapes.generate('validation', seed=8, **TINY)
  assert _digest(first) == _digest(second)
  assert not np.array_equal(first.images, other.images)
  # Nearly every image differs, not just a few (the whole stream depends on the seed).
  differs = np.any(first.images != other.images, axis=(1, 2, 3))
  assert differs.mean() > 0.9


def test_splits_use_independent_streams():
  train = shapes.sample_layout('train', seed=0, images_per_class=4, train_fraction=0.5)
  validation = shapes.sample_layout('validation', seed=0, images_per_class=4,
                                    train_fraction=0.5)
  assert not np.array_equal(train.corners, validation.corners)


def test_bytes_identical_in_a_fresh_process_with_another_hash_seed():
  code = ('from cgl_jax.data import shapes; import hashlib, numpy as np; '
          'e = shapes.generate("validation", seed=7, images_per_class=10, train_fraction=0.8); '
          'h = hashlib.sha256(); '
          '[h.update(np.ascontiguousarray(a).tobytes()) for a in '
          '(e.images, e.labels, e.color_map, e.shape_map)]; print(h.hexdigest())')
  env = dict(os.environ, PYTHONHASHSEED='12345')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=env, check=True).stdout.strip()
  assert out == _digest(shapes.generate('validation', seed=7, **TINY))


def test_stream_is_pinned_across_machines_and_numpy_versions():
  # The generator promises byte-identical data on every machine: it uses only
  # PCG64's raw output (a fixed algorithm) and integer arithmetic. This digest
  # pins that stream; if it changes, the dataset changed: bump the tfds VERSION.
  layout = shapes.sample_layout('train', seed=0, images_per_class=2, train_fraction=0.5)
  little_endian = [np.asarray(a, '<i4').tobytes() for a in (layout.items, layout.corners)]
  digest = hashlib.sha256(b''.join(little_endian)).hexdigest()
  assert digest == PINNED_LAYOUT_DIGEST


PINNED_LAYOUT_DIGEST = 'a0837aa603109633ec52ddccc6a50ec8c268351dede6dd7eac39d5309c40ef0f'


# ----------------------------------------------------------------------------
# Geometry.


def _reference_stamp(shape: str) -> np.ndarray:
  """The shapes from their geometric definitions, one pixel at a time (floats)."""
  d = shapes.SHAPE_SIZE
  stamp = np.zeros((d, d), bool)
  for r, c in itertools.product(range(d), range(d)):
    y, x = r + 0.5, c + 0.5  # pixel centre
    if shape == 'square':
      stamp[r, c] = True
    elif shape == 'circle':
      stamp[r, c] = math.hypot(y - d / 2, x - d / 2) <= d / 2
    else:  # apex (0, d/2), base on y = d: inside where |x - d/2| <= y / 2,
      # sampled at the middle of the pixel's lower edge.
      stamp[r, c] = abs(x - d / 2) <= (r + 1) / 2
  return stamp


@pytest.mark.parametrize('shape', shapes.SHAPES)
def test_stamps_match_geometry(shape):
  stamp = shapes.STAMPS[shapes.SHAPES.index(shape)]
  np.testing.assert_array_equal(stamp, _reference_stamp(shape))
  # Filled, symmetric about the vertical axis, touching all four sides
  # except the triangle's top corners ("about 12 px across").
  np.testing.assert_array_equal(stamp, stamp[:, ::-1])
  assert stamp[:, 0].any() and stamp[:, -1].any()
  assert stamp[0].any() and stamp[-1].any()
  area = {'square': 144, 'circle': math.pi * 36, 'triangle': 72}[shape]
  assert abs(stamp.sum() - area) <= 0.2 * area


def _reference_render(layout: shapes.Layout, index: int):
  """Per-pixel reference drawing of one image from its layout."""
  size = shapes.IMAGE_SIZE
  color_map = np.zeros((size, size), np.uint8)
  shape_map = np.zeros((size, size), np.uint8)
  for slot in range(2):
    color, shape = divmod(int(layout.items[index, slot]), 3)
    stamp = _reference_stamp(shapes.SHAPES[shape])
    top, left = layout.corners[index, slot]
    for r, c in itertools.product(range(size), range(size)):
      dr, dc = r - top, c - left
      if 0 <= dr < shapes.SHAPE_SIZE and 0 <= dc < shapes.SHAPE_SIZE and stamp[dr, dc]:
        color_map[r, c] = color + 1
        shape_map[r, c] = shape + 1
  return color_map, shape_map


def test_render_matches_per_pixel_reference(tiny_train):
  for index in range(0, len(tiny_train), 73):  # 5 images
    color_map, shape_map = _reference_render(tiny_train.layout, index)
    np.testing.assert_array_equal(tiny_train.color_map[index], color_map)
    np.testing.assert_array_equal(tiny_train.shape_map[index], shape_map)


def test_one_shape_per_half_inside_the_image(tiny_train):
  half = shapes.IMAGE_SIZE // 2
  for index in range(len(tiny_train)):
    for slot, rows in enumerate((slice(0, half), slice(half, None))):
      shape_map = tiny_train.shape_map[index, rows]
      color_map = tiny_train.color_map[index, rows]
      color, shape = divmod(int(tiny_train.layout.items[index, slot]), 3)
      # Exactly the slot's item, with its full area (nothing clipped).
      assert set(np.unique(shape_map)) == {0, shape + 1}
      assert set(np.unique(color_map)) == {0, color + 1}
      assert (shape_map > 0).sum() == shapes.STAMPS[shape].sum()
      r, c = np.nonzero(shape_map)
      assert r.max() - r.min() < shapes.SHAPE_SIZE
      assert c.max() - c.min() < shapes.SHAPE_SIZE
  corners = tiny_train.layout.corners
  assert corners.min() >= 0
  assert np.all(corners[:, 0, 0] + shapes.SHAPE_SIZE <= half)
  assert np.all(corners[:, 1, 0] >= half)
  assert np.all(corners + shapes.SHAPE_SIZE <= shapes.IMAGE_SIZE)


def test_positions_and_order_are_random(tiny_train):
  corners = tiny_train.layout.corners
  # Every column offset range is used broadly and both orders occur.
  assert len(np.unique(corners[:, :, 1])) > 40
  assert len(np.unique(corners[:, 0, 0])) > 15
  items = tiny_train.layout.items
  distinct = items[:, 0] != items[:, 1]
  smaller_on_top = (items[:, 0] < items[:, 1])[distinct].mean()
  assert 0.35 < smaller_on_top < 0.65


def test_images_are_pure_colours_on_white(tiny_train):
  pixels = tiny_train.images.reshape(-1, 3)
  allowed = {tuple(p) for p in shapes.PALETTE}
  assert {tuple(p) for p in np.unique(pixels, axis=0)} == allowed
  assert tiny_train.images.dtype == np.uint8
  assert tiny_train.images.shape == (360, 64, 64, 3)


# ----------------------------------------------------------------------------
# Concept masks.


def test_masks_are_exact(tiny_train):
  images = tiny_train.images
  masks = shapes.concept_masks(tiny_train.color_map, tiny_train.shape_map)
  assert masks.shape == images.shape[:3] + (15,) and masks.dtype == bool
  names = [name for name, _ in shapes.CONCEPTS]
  categories = np.array([category for _, category in shapes.CONCEPTS])

  rgb = {'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255)}
  for name, colour in rgb.items():
    # The colour mask is exactly the pixels of that colour in the image.
    np.testing.assert_array_equal(masks[..., names.index(name)],
                                  np.all(images == colour, axis=-1))
  for name, _ in shapes.CONCEPTS:
    # Every masked pixel has the named colour (none for pure shapes: any colour).
    colour = name.split('_')[0]
    if colour in rgb:
      assert np.all(images[masks[..., names.index(name)]] == rgb[colour])

  non_white = np.any(images != 255, axis=-1)
  for category, expected in (('color', non_white), ('shape', non_white),
                             ('color_shape', non_white)):
    # Every non-white pixel in exactly one concept of each category, white in none.
    np.testing.assert_array_equal(masks[..., categories == category].sum(-1),
                                  expected.astype(int))
  for colour, shape in itertools.product(shapes.COLORS, shapes.SHAPES):
    np.testing.assert_array_equal(
        masks[..., names.index(f'{colour}_{shape}')],
        masks[..., names.index(colour)] & masks[..., names.index(shape)])


def test_concept_label_maps_are_broden_label_ids(tiny_train):
  maps = shapes.concept_label_maps(tiny_train.color_map, tiny_train.shape_map)
  assert set(maps) == set(shapes.CATEGORIES)
  for category, label_map in maps.items():
    ids = set(np.unique(label_map)) - {0}
    expected = {i for i, (_, c) in enumerate(shapes.CONCEPTS, start=1) if c == category}
    assert ids == expected, category
  assert shapes.CONCEPTS[:6] == (('red', 'color'), ('green', 'color'),
                                 ('blue', 'color'), ('square', 'shape'),
                                 ('circle', 'shape'), ('triangle', 'shape'))
  assert shapes.CONCEPTS[6 + 3 * 2 + 1] == ('blue_circle', 'color_shape')


def test_concept_maps_reject_inconsistent_maps():
  color_map = np.zeros((1, 4, 4), np.uint8)
  shape_map = color_map.copy()
  shape_map[0, 1, 1] = 2
  with pytest.raises(ValueError, match='disagree on which pixels are background'):
    shapes.concept_label_maps(color_map, shape_map)
  with pytest.raises(ValueError, match=r'must have the same shape'):
    shapes.concept_label_maps(color_map, shape_map[:, :2])


# ----------------------------------------------------------------------------
# Labels and splits.


def _items_from_maps(examples: shapes.Examples) -> list[tuple[int, int]]:
  """The two item ids of each image, read back from its label maps."""
  half = shapes.IMAGE_SIZE // 2
  out = []
  for color_map, shape_map in zip(examples.color_map, examples.shape_map):
    items = []
    for rows in (slice(0, half), slice(half, None)):
      c, s = color_map[rows].max(), shape_map[rows].max()
      items.append(3 * (int(c) - 1) + int(s) - 1)
    out.append(tuple(sorted(items)))
  return out


def test_classes45_labels_are_the_unordered_pairs(tiny_train):
  names = shapes.class_names('classes45')
  assert len(names) == 45 == len(set(names)) == shapes.num_classes('classes45')
  read_back = [f'{shapes.ITEMS[a]}+{shapes.ITEMS[b]}' for a, b in _items_from_maps(tiny_train)]
  assert [names[label] for label in tiny_train.labels] == read_back
  assert set(tiny_train.labels) == set(range(45))


def test_binary_label_is_one_exactly_when_a_square_is_drawn():
  examples = shapes.generate('validation', setting='binary', seed=1, **TINY)
  square = shapes.concept_masks(examples.color_map, examples.shape_map)[
      ..., shapes.CONCEPTS.index(('square', 'shape'))]
  np.testing.assert_array_equal(examples.labels, square.any(axis=(1, 2)).astype(np.int32))
  assert shapes.class_names('binary') == ('no_square', 'square')


def test_binary_relabels_the_classes45_images():
  binary = shapes.generate('validation', setting='binary', seed=1, **TINY)
  classes45 = shapes.generate('validation', setting='classes45', seed=1, **TINY)
  np.testing.assert_array_equal(binary.images, classes45.images)


@pytest.mark.parametrize('split,per_class', [('train', 512), ('validation', 128)])
def test_default_sizes_and_class_balance_per_split(split, per_class):
  layout = shapes.sample_layout(split)  # the full default size (no rendering)
  assert len(layout) == 45 * per_class
  np.testing.assert_array_equal(np.bincount(layout.pair_classes, minlength=45),
                                np.full(45, per_class))
  # 24 of the 45 pairs hold a square: 3 square items paired with any of 9
  # items, minus the 3 double-counted square-square pairs.
  counts = np.bincount(shapes.labels(layout, 'binary'), minlength=2)
  np.testing.assert_array_equal(counts, [21 * per_class, 24 * per_class])
  # Shuffled, not sorted by class.
  assert np.mean(np.diff(layout.pair_classes) == 0) < 0.1


def test_split_sizes():
  assert shapes.split_sizes() == {'train': 512, 'validation': 128}
  assert shapes.split_sizes(images_per_class=10, train_fraction=0.5) == {
      'train': 5, 'validation': 5}


def test_chunked_drawing_equals_whole_drawing(tiny_train):
  chunk = shapes.draw(tiny_train.layout[100:150], 'classes45')
  np.testing.assert_array_equal(chunk.images, tiny_train.images[100:150])
  np.testing.assert_array_equal(chunk.labels, tiny_train.labels[100:150])


@pytest.mark.parametrize('kwargs,message', [
    (dict(split='test'), "split must be one of ('train', 'validation'); got 'test'."),
    (dict(setting='ten'), "setting must be one of ('binary', 'classes45'); got 'ten'."),
    (dict(seed=-1), 'seed must be a non-negative integer; got -1.'),
    (dict(images_per_class=1),
     'images_per_class must be an integer >= 2 (one image per class in each split); got 1.'),
    (dict(images_per_class=2.5),
     'images_per_class must be an integer >= 2 (one image per class in each split); got 2.5.'),
    (dict(train_fraction=1.0), 'train_fraction must lie in (0, 1); got 1.0.'),
    (dict(images_per_class=3, train_fraction=0.9),
     "images_per_class=3 with train_fraction=0.9 leaves a split empty "
     "({'train': 3, 'validation': 0}); use more images."),
])
def test_bad_arguments_are_named(kwargs, message):
  kwargs = {'split': 'validation', **kwargs}
  with pytest.raises(ValueError) as error:
    shapes.generate(kwargs.pop('split'), **kwargs)
  assert str(error.value) == message


# ----------------------------------------------------------------------------
# Broden export.


@pytest.fixture(scope='module')
def broden_export(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('broden') / 'shapes')
  kwargs = dict(split='validation', seed=2, images_per_class=4, train_fraction=0.5)
  shapes.export_broden(directory, **kwargs)
  return directory, shapes.generate(**kwargs)


def test_broden_round_trip(broden_export):
  directory, expected = broden_export
  probe = broden.Broden(directory)
  assert len(probe) == len(expected) == 90
  assert probe.categories == shapes.CATEGORIES
  assert probe.label_names()[1:] == tuple(name for name, _ in shapes.CONCEPTS)
  assert [label.category for label in probe.labels[1:]] == [c for _, c in shapes.CONCEPTS]
  (batch,) = probe.batches(batch_size=len(probe), num_threads=1)
  np.testing.assert_array_equal(batch['image'], expected.images)
  label_maps = shapes.concept_label_maps(expected.color_map, expected.shape_map)
  for category in shapes.CATEGORIES:
    np.testing.assert_array_equal(batch['pixel_labels'][category][:, 0], label_maps[category])
  # Label statistics: every image holds exactly two of the 9 colour-shape items.
  frequency = sum(probe.labels[i].frequency for i in range(7, 16))
  assert frequency == np.sum([len(set(items)) for items in expected.layout.items])


def test_broden_export_refuses_to_overwrite(broden_export):
  directory, _ = broden_export
  with pytest.raises(FileExistsError, match='exists; pass overwrite=True'):
    shapes.export_broden(directory, images_per_class=2, train_fraction=0.5)


def test_malformed_exported_index_row_is_named(broden_export, tmp_path):
  directory = str(tmp_path / 'corrupt')
  shutil.copytree(broden_export[0], directory)
  index = os.path.join(directory, 'index.csv')
  with open(index) as f:
    lines = f.read().splitlines()
  lines[3] = lines[3].replace(',64,64,64,64,', ',64,sixty-four,64,64,', 1)
  with open(index, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with pytest.raises(broden.BrodenFormatError,
                     match=rf"{re.escape(index)}, line 4: column 'iw' must be an integer"):
    broden.Broden(directory)


def test_broden_export_of_all_images_as_jpeg(tmp_path):
  """split='all' probes train then validation images (the authors' 28,800 at full size); JPEG
  quality 95 stores the images lossy (as the authors' probe set) and the label PNGs exactly."""
  kwargs = dict(seed=2, images_per_class=4, train_fraction=0.5)
  directory = shapes.export_broden(str(tmp_path / 'all'), split='all', image_format='jpeg',
                                   **kwargs)
  train, validation = (shapes.generate(s, **kwargs) for s in shapes.SPLITS)
  probe = broden.Broden(directory)
  assert len(probe) == len(train) + len(validation) == 180
  assert [row.split for row in probe.rows] == ['train'] * 90 + ['val'] * 90
  assert all(row.image.endswith('.jpg') for row in probe.rows)
  with Image.open(probe.image_path(0)) as image:
    assert image.format == 'JPEG'
  (batch,) = probe.batches(batch_size=len(probe), num_threads=1)
  images = np.concatenate([train.images, validation.images])
  error = np.abs(batch['image'].astype(int) - images)
  assert 0 < error.mean() < 2 and error.max() > 8  # lossy, mostly at the shapes' edges
  label_maps = shapes.concept_label_maps(np.concatenate([train.color_map, validation.color_map]),
                                         np.concatenate([train.shape_map, validation.shape_map]))
  for category in shapes.CATEGORIES:
    np.testing.assert_array_equal(batch['pixel_labels'][category][:, 0], label_maps[category])
  assert len(broden.Broden(directory, split='val')) == 90


def test_broden_export_rejects_unknown_split_and_format(tmp_path):
  with pytest.raises(ValueError, match=r"split must be one of \('train', 'validation', 'all'\); "
                                       r"got 'test'"):
    shapes.export_broden(str(tmp_path / 'a'), split='test')
  with pytest.raises(ValueError, match=r"image_format must be one of \('png', 'jpeg'\); got 'gif'"):
    shapes.export_broden(str(tmp_path / 'b'), image_format='gif', images_per_class=2,
                         train_fraction=0.5)
