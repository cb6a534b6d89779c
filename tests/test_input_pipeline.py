"""Tests of cgl_jax.input_pipeline on mocked cifar10 and on the locally built cgl_shapes."""
import itertools
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cgl_jax import default_config, input_pipeline

NUM_MOCK = 10  # examples per split of the mocked cifar10


def _config(**overrides):
  config = default_config.get_config().dataset
  config.update(dict(name='cifar10', image_size=32, augment='none', shuffle_buffer=64,
                     # tfds.testing.mock_data reports every dataset as not prepared and makes
                     # download_and_prepare a no-op, so mocked runs must opt in to "download".
                     download=True))
  config.update(overrides)
  return config


@pytest.fixture
def mock_cifar():
  """Mocked cifar10 (10 random 32×32 images per split) and its raw uint8 train/test images.

  Function-scoped: the mock patches tfds globally while active.
  """
  with tfds.testing.mock_data(num_examples=NUM_MOCK):
    builder = tfds.builder('cifar10')
    raw = {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
           for split in ('train', 'test')}
    yield {split: (np.stack([ex['image'] for ex in examples]),
                   np.array([ex['label'] for ex in examples]))
           for split, examples in raw.items()}


def _take(config, count, **kwargs):
  kwargs = dict(dict(split='train', train=True, batch_size=4, seed=0), **kwargs)
  return list(itertools.islice(input_pipeline.create_split(config, **kwargs), count))


def _denormalise(config, images):
  mean, std = input_pipeline.normalization(config)
  return images * std + mean


def _rows(images):
  """Hashable rows to compare images as sets/multisets."""
  return [np.round(image).astype(np.uint8).tobytes() for image in images]


def test_train_batches_have_the_contract_shapes_and_dtypes(mock_cifar):
  del mock_cifar
  batch, = _take(_config(augment='pad_crop'), 1, batch_size=8, process_count=2, process_index=1)
  assert sorted(batch) == ['image', 'label']
  assert (batch['image'].shape, batch['image'].dtype) == ((4, 32, 32, 3), np.float32)
  assert (batch['label'].shape, batch['label'].dtype) == ((4,), np.int32)


def test_eval_is_normalised_raw_images_in_order_with_padding_mask(mock_cifar):
  """No augmentation: image·std + mean gives back the stored pixels; 10 rows → 4 + 4 + 2(+2 pad)."""
  raw_images, raw_labels = mock_cifar['test']
  config = _config(mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
  batches = list(input_pipeline.create_split(config, split='test', train=False, batch_size=4,
                                             seed=0))
  assert [batch['mask'].tolist() for batch in batches] == [[True] * 4, [True] * 4,
                                                           [True, True, False, False]]
  images = np.concatenate([batch['image'] for batch in batches])
  labels = np.concatenate([batch['label'] for batch in batches])
  np.testing.assert_allclose(images[:NUM_MOCK], (raw_images - [10, 20, 30]) / [2, 4, 8],
                             rtol=1e-6)
  np.testing.assert_array_equal(labels[:NUM_MOCK], raw_labels)
  assert np.all(images[NUM_MOCK:] == 0) and np.all(labels[NUM_MOCK:] == 0)


def test_train_epochs_are_permutations_that_differ(mock_cifar):
  """augment='none', 10 examples, batch 5: batches (0, 1) and (2, 3) are two epochs."""
  raw_images, _ = mock_cifar['train']
  config = _config()
  batches = _take(config, 4, batch_size=5)
  epochs = [_rows(_denormalise(config, np.concatenate([a['image'], b['image']])))
            for a, b in (batches[:2], batches[2:])]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(_rows(raw_images))
  assert epochs[0] != epochs[1]
  assert epochs[0] != _rows(raw_images)  # shuffled


def test_pad_crop_is_a_shifted_possibly_flipped_window_of_the_padded_image(mock_cifar):
  raw_images, _ = mock_cifar['train']
  padded = np.pad(raw_images.astype(np.float32), ((0, 0), (4, 4), (4, 4), (0, 0)))
  config = _config(augment='pad_crop')
  images = _denormalise(config, np.concatenate([b['image'] for b in _take(config, 5)]))
  windows = {(source, dy, dx, flip): window[:, ::-1] if flip else window
             for source in range(len(padded)) for dy in range(9) for dx in range(9)
             for flip in (False, True)
             for window in [padded[source, dy:dy + 32, dx:dx + 32]]}
  offsets = set()
  for image in images:
    matches = [key[1:] for key, window in windows.items()
               if np.allclose(window, image, atol=1e-3)]
    assert matches, 'augmented image is no crop of any padded source image'
    offsets.update(matches)
  assert len({(dy, dx) for dy, dx, _ in offsets}) > 1
  assert {flip for _, _, flip in offsets} == {False, True}


def test_random_resized_crop_eval_is_the_resize_256_center_crop_224_window(mock_cifar):
  """image_size 28 on 32² images: Resize(32) → CenterCrop(28) keeps rows and columns 2…29."""
  raw_images, _ = mock_cifar['test']
  config = _config(augment='random_resized_crop', image_size=28)
  batch = next(input_pipeline.create_split(config, split='test', train=False, batch_size=10,
                                           seed=0))
  np.testing.assert_allclose(_denormalise(config, batch['image']), raw_images[:, 2:30, 2:30],
                             atol=1e-3)
  train_batch, = _take(config, 1, batch_size=10)
  assert train_batch['image'].shape == (10, 28, 28, 3)
  assert np.all(np.isfinite(train_batch['image']))


def test_pad_crop_pads_with_pad_value(mock_cifar):
  """A white (or any RGB) border instead of zeros: every crop is a window of the image padded
  with pad_value, and some windows show the border."""
  raw_images, _ = mock_cifar['train']
  pad_value = (255.0, 128.0, 3.0)
  padded = np.pad(raw_images.astype(np.float32), ((0, 0), (4, 4), (4, 4), (0, 0)))
  border = np.ones(padded.shape[1:3], bool)
  border[4:-4, 4:-4] = False
  padded[:, border] = pad_value
  config = _config(augment='pad_crop', pad_value=pad_value)
  images = _denormalise(config, np.concatenate([b['image'] for b in _take(config, 3)]))
  shows_border = 0
  for image in images:
    matches = [(dy, dx) for source in range(len(padded)) for dy in range(9) for dx in range(9)
               for window in [padded[source, dy:dy + 32, dx:dx + 32]]
               if np.allclose(window, image, atol=1e-3)
               or np.allclose(window[:, ::-1], image, atol=1e-3)]
    assert matches, 'augmented image is no crop of any image padded with pad_value'
    shows_border += matches[0] != (4, 4)
  assert shows_border > 0


def test_eval_crop_none_evaluates_on_the_whole_image(mock_cifar):
  """random_resized_crop with eval_crop='none': the eval transform is the identity at the
  stored size (the authors' Resize(64) + CenterCrop(64) of 64-px images), not 28 of 32 px."""
  raw_images, _ = mock_cifar['test']
  config = _config(augment='random_resized_crop', eval_crop='none')
  batch = next(input_pipeline.create_split(config, split='test', train=False, batch_size=10,
                                           seed=0))
  np.testing.assert_allclose(_denormalise(config, batch['image']), raw_images, atol=1e-3)
  config = _config(augment='none', eval_crop='center', image_size=28)
  batch = next(input_pipeline.create_split(config, split='test', train=False, batch_size=10,
                                           seed=0))
  np.testing.assert_allclose(_denormalise(config, batch['image']), raw_images[:, 2:30, 2:30],
                             atol=1e-3)


@pytest.mark.parametrize('overrides,message', [
    (dict(eval_crop='middle'), "dataset.eval_crop must be one of ('center', 'none') or None"),
    (dict(pad_value=(0.0, 300.0, 0.0)), 'dataset.pad_value must be one value or 3 (RGB) in '
                                        '[0, 255], got (0.0, 300.0, 0.0)'),
])
def test_bad_eval_crop_and_pad_value_are_named(overrides, message):
  with pytest.raises(ValueError) as error:
    input_pipeline.preprocess_options(_config(**overrides))
  assert message in str(error.value)


def test_same_seed_same_batches_other_seed_other_batches(mock_cifar):
  del mock_cifar
  config = _config(augment='random_resized_crop')
  first, again, other = (_take(config, 3, seed=seed) for seed in (3, 3, 4))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['image'], other[0]['image'])


@pytest.mark.parametrize('augment', ['pad_crop', 'random_resized_crop'])
def test_resuming_at_step_k_yields_the_uninterrupted_batches(mock_cifar, augment):
  """Batch 4: 10 examples per epoch, so steps 2 and 5 start inside epochs 0 and 2."""
  del mock_cifar
  config = _config(augment=augment)
  straight = _take(config, 8)
  for start_step in (2, 5):
    resumed = _take(config, 8 - start_step, start_step=start_step)
    for step, batch in enumerate(resumed, start=start_step):
      np.testing.assert_array_equal(batch['image'], straight[step]['image'], err_msg=str(step))
      np.testing.assert_array_equal(batch['label'], straight[step]['label'])


def test_missing_dataset_fails_fast_with_the_prepare_command(tmp_path):
  config = _config(download=False, data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.create_split(config, split='train', train=True, batch_size=4, seed=0)
  elapsed = time.monotonic() - start
  assert elapsed < 20, f'took {elapsed:.1f} s to report a missing dataset'
  message = str(error.value)
  assert message.startswith(f"Dataset 'cifar10' is not prepared in data_dir '{tmp_path}'")
  assert 'Nothing is downloaded unless config.dataset.download=True' in message
  assert message.endswith(f'Prepare it with:\n  tfds build cifar10 --data_dir={tmp_path}')
  assert not any(tmp_path.iterdir()), 'a failed lookup must not write into data_dir'


def test_missing_manual_dataset_names_the_manual_dir(tmp_path):
  config = _config(download=False, data_dir=str(tmp_path), name='imagenet2012')
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar') as error:
    input_pipeline.num_examples(config, 'train')
  assert str(error.value).endswith(
      f'tfds build imagenet2012 --data_dir={tmp_path} --manual_dir={tmp_path}/downloads/manual')


def test_bad_arguments_raise_clear_errors(tmp_path):
  config = _config(download=False, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'batch_size 6 \(global\) must be a positive multiple of '
                                       r'the process count 4'):
    input_pipeline.create_split(config, split='train', train=True, batch_size=6, seed=0,
                                process_index=0, process_count=4)
  with pytest.raises(ValueError, match="dataset.augment must be one of .* got 'autoaugment'"):
    input_pipeline.create_split(_config(augment='autoaugment'), split='train', train=True,
                                batch_size=4, seed=0)
  with pytest.raises(ValueError, match='start_step must be >= 0, and 0 for evaluation'):
    input_pipeline.create_split(config, split='test', train=False, batch_size=4, seed=0,
                                start_step=3)
  with pytest.raises(ValueError, match="Unknown tfds dataset 'cifar11'"):
    input_pipeline.num_examples(_config(name='cifar11', data_dir=str(tmp_path)), 'train')
  with pytest.raises(ValueError, match='look like the 0–1 scale'):
    input_pipeline.normalization(_config(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))


def test_normalization_returns_float32_on_the_0_255_scale():
  mean, std = input_pipeline.normalization(default_config.get_config().dataset)
  assert mean.dtype == std.dtype == np.float32
  np.testing.assert_allclose(mean, [123.675, 116.28, 103.53], rtol=1e-6)
  np.testing.assert_allclose(std, [58.395, 57.12, 57.375], rtol=1e-6)


@pytest.fixture(scope='module')
def shapes_tiny(tmp_path_factory):
  """cgl_shapes/binary_tiny (360 train / 90 validation) built into a temp data_dir."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = _config(name='cgl_shapes/binary_tiny', data_dir=data_dir, image_size=64,
                   download=False)  # generated locally even without download
  input_pipeline.num_examples(config, 'validation')  # builds it on first use
  builder = tfds.builder('cgl_shapes/binary_tiny', data_dir=data_dir)
  raw = list(tfds.as_numpy(builder.as_dataset(split='validation', shuffle_files=False)))
  return config, np.stack([ex['image'] for ex in raw]), np.array([ex['label'] for ex in raw])


def test_eval_shards_cover_every_example_exactly_once(shapes_tiny):
  """3 processes × 4 rows: 30 examples each → 8 batches each, 2 padded rows each."""
  config, raw_images, raw_labels = shapes_tiny
  assert input_pipeline.num_examples(config, 'validation') == len(raw_images) == 90
  images, labels, batch_counts = [], [], []
  for process_index in range(3):
    batches = list(input_pipeline.create_split(
        config, split='validation', train=False, batch_size=12, seed=0,
        process_index=process_index, process_count=3))
    batch_counts.append(len(batches))
    for batch in batches:
      images.append(batch['image'][batch['mask']])
      labels.append(batch['label'][batch['mask']])
  assert batch_counts == [8, 8, 8]
  np.testing.assert_allclose(_denormalise(config, np.concatenate(images)), raw_images,
                             atol=1e-3)
  np.testing.assert_array_equal(np.concatenate(labels), raw_labels)


def test_train_shards_of_processes_are_disjoint(shapes_tiny):
  config = shapes_tiny[0].copy_and_resolve_references()
  config.augment = 'none'
  per_process = [set(_rows(_denormalise(config, np.concatenate([b['image'] for b in _take(
      config, 3, batch_size=60, process_index=index, process_count=2)]))))
      for index in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 90  # 3 × 30 rows, within one epoch
  assert not per_process[0] & per_process[1]


def test_prefetch_to_device_shards_the_batch_over_8_devices(python_subprocess):
  python_subprocess("""
      import jax, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from cgl_jax import input_pipeline
      sharding = NamedSharding(jax.make_mesh((8,), ('data',)), P('data'))
      batches = [{'image': np.full((16, 2, 2, 3), step, np.float32),
                  'label': np.arange(16, dtype=np.int32) + step} for step in range(5)]
      out = list(input_pipeline.prefetch_to_device(iter(batches), 2, sharding))
      assert len(out) == 5
      for step, batch in enumerate(out):
        assert batch['image'].sharding == sharding and batch['label'].sharding == sharding
        assert [s.data.shape for s in batch['image'].addressable_shards] == [(2, 2, 2, 3)] * 8
        np.testing.assert_array_equal(batch['label'], np.arange(16) + step)
        np.testing.assert_array_equal(batch['image'], step)
      print('ok')
      """, num_devices=8)
