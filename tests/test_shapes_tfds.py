"""Tests of the tfds builder `cgl_shapes` (cgl_jax/data/shapes_tfds.py)."""
import hashlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cgl_jax.data import shapes
from cgl_jax.data import shapes_tfds


def _example_digests(images, labels, color_map, shape_map):
  """Sorted per-example digests: compares datasets whatever their order."""
  return sorted(
      hashlib.sha256(image.tobytes() + np.int64(label).tobytes() + c.tobytes()
                     + s.tobytes()).hexdigest()
      for image, label, c, s in zip(images, labels, color_map, shape_map))


def _load_all(name, data_dir, split, **kwargs):
  ds = tfds.load(name, data_dir=data_dir, split=split, batch_size=-1, **kwargs)
  return tfds.as_numpy(ds)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('cgl_shapes/binary_tiny', data_dir=data_dir).download_and_prepare()
  return data_dir


def test_builder_is_registered_with_its_configs():
  assert 'cgl_shapes' in tfds.list_builders()
  builder = tfds.builder('cgl_shapes/classes45', data_dir='/nonexistent')
  assert builder.info.features['label'].names == list(shapes.class_names('classes45'))
  assert builder.builder_config.sizes() == {'train': 512, 'validation': 128}
  assert str(builder.info.version) == '1.0.0'
  assert '1.0.0' in builder.info.release_notes
  assert tfds.builder('cgl_shapes', data_dir='/nonexistent').builder_config.name == 'binary'


@pytest.mark.parametrize('split', shapes.SPLITS)
def test_round_trip_equals_the_generator(data_dir, split):
  loaded = _load_all('cgl_shapes/binary_tiny', data_dir, split)
  assert loaded['image'].shape[1:] == (64, 64, 3) and loaded['image'].dtype == np.uint8
  assert loaded['color_map'].shape[1:] == (64, 64, 1) and loaded['color_map'].dtype == np.uint8
  assert loaded['shape_map'].shape[1:] == (64, 64, 1)
  expected = shapes.generate(split, setting='binary', seed=0, images_per_class=10)
  assert len(loaded['label']) == len(expected) == {'train': 360, 'validation': 90}[split]
  assert _example_digests(loaded['image'], loaded['label'], loaded['color_map'][..., 0],
                          loaded['shape_map'][..., 0]) == _example_digests(
      expected.images, expected.labels, expected.color_map, expected.shape_map)


def test_loaded_masks_and_labels_agree(data_dir):
  loaded = _load_all('cgl_shapes/binary_tiny', data_dir, 'validation')
  masks = shapes.concept_masks(loaded['color_map'][..., 0], loaded['shape_map'][..., 0])
  has_square = masks[..., shapes.CONCEPTS.index(('square', 'shape'))].any(axis=(1, 2))
  np.testing.assert_array_equal(loaded['label'], has_square)
  non_white = np.any(loaded['image'] != 255, axis=-1)
  np.testing.assert_array_equal(masks[..., :3].sum(-1), non_white)


def test_second_load_reuses_the_prepared_data(data_dir, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the dataset was generated again')
  monkeypatch.setattr(shapes, 'sample_layout', fail)
  loaded = _load_all('cgl_shapes/binary_tiny', data_dir, 'train')
  assert len(loaded['label']) == 360


def test_custom_config_sets_sizes_seed_and_setting(tmp_path):
  config = shapes_tfds.CglShapesConfig(name='classes45_two', setting='classes45',
                                       images_per_class=2, train_fraction=0.5, seed=5)
  builder = tfds.builder('cgl_shapes', config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  loaded = tfds.as_numpy(builder.as_dataset(split='validation', batch_size=-1))
  assert sorted(loaded['label']) == list(range(45))
  expected = shapes.generate('validation', setting='classes45', seed=5,
                             images_per_class=2, train_fraction=0.5)
  assert _example_digests(loaded['image'], loaded['label'], loaded['color_map'][..., 0],
                          loaded['shape_map'][..., 0]) == _example_digests(
      expected.images, expected.labels, expected.color_map, expected.shape_map)


def test_custom_config_may_not_reuse_a_builtin_name(tmp_path):
  config = shapes_tfds.CglShapesConfig(name='binary', images_per_class=8)
  with pytest.raises(ValueError, match=r"CglShapesConfig name 'binary' is a built-in "
                     r"config .* Give a custom config a new name"):
    tfds.builder('cgl_shapes', config=config, data_dir=str(tmp_path))


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match=r"CglShapesConfig 'x': setting must be one of "
                     r"\('binary', 'classes45'\); got 'ten'"):
    shapes_tfds.CglShapesConfig(name='x', setting='ten')
  with pytest.raises(ValueError, match='images_per_class must be an integer >= 2'):
    shapes_tfds.CglShapesConfig(name='x', images_per_class=1)


def test_input_pipeline_serves_the_generator_images_and_labels(data_dir):
  from cgl_jax import input_pipeline
  from cgl_jax import default_config
  config = default_config.get_config().dataset
  config.update(dict(name='cgl_shapes/binary_tiny', data_dir=data_dir, augment='none',
                     image_size=64, shuffle_buffer=64))
  batches = list(itertools.islice(input_pipeline.create_split(
      config, split='train', train=True, batch_size=8, seed=0), 3))
  expected = shapes.generate('train', setting='binary', seed=0, images_per_class=10)
  label_of = {image.tobytes(): label for image, label in zip(expected.images, expected.labels)}
  mean, std = input_pipeline.normalization(config)
  for batch in batches:
    assert batch['image'].shape == (8, 64, 64, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    raw = np.round(batch['image'] * std + mean).astype(np.uint8)
    assert [label_of[image.tobytes()] for image in raw] == list(batch['label'])
