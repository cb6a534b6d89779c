"""tfds input pipeline: deterministic, resumable, per-process batches of normalised images.

    batches = create_split(config.dataset, split='train', train=True, batch_size=256, seed=0,
                           start_step=restored_step)
    for batch in prefetch_to_device(batches, 2, NamedSharding(mesh, P('data'))): ...

Determinism and resumption. Every random choice is a function of (seed, process, position):
- Each process reads its own equal shard of the split (`tfds.even_splits`), in file order.
- Epoch e of a shard is that shard shuffled through a buffer of `shuffle_buffer` examples whose
  seed is derived from (seed, process, e); the train stream is epoch 0, 1, 2, … concatenated and
  batched with `drop_remainder` (a batch may straddle two epochs).
- Example n of the stream (n = step·b + row) is augmented with stateless ops seeded from
  (seed, process, n).
So the batch at step k depends on k only: `create_split(..., start_step=k)` starts at epoch
⌊k·b / N⌋ and skips the first (k·b mod N) examples of it (still encoded, so skipping costs
reading, not decoding), and yields exactly the batches an uninterrupted run sees from step k on.
tfds shuffles examples when it writes a dataset, so reading files in order and shuffling through
a buffer mixes classes well.

Augmentation (`dataset_config.augment`, training only):
- 'random_resized_crop' (the paper; torchvision RandomResizedCrop): a crop of 8–100 % of the
  area with aspect ratio in [3/4, 4/3], resized to image_size², random horizontal flip. Eval:
  the central crop that `Resize(image_size·256/224)` + `CenterCrop(image_size)` keep, resized
  to image_size² (224 → 256 → 224 as in the paper).
- 'pad_crop' (CIFAR): pad 4 px with `dataset_config.pad_value` (0–255 scale, per channel or one
  value; default 0, the shapes data use their white background), random image_size² crop,
  random horizontal flip. Eval: the image as is.
- 'none': the image as is.
`dataset_config.eval_crop` overrides the evaluation transform: 'center' (the central crop
above) or 'none' (the whole image resized to image_size², e.g. the CGL authors' synthetic-data
`Resize(64)` + `CenterCrop(64)` of 64-px images); None (the default) keeps the augmentation's.
Images whose size differs from image_size are resized (bilinear) where the recipe does not crop.
Then x ← (x − mean) / std per channel, with mean and std on the 0–255 scale.

Missing data fails fast (no download unless `dataset_config.download`), naming the dataset,
the data_dir and the command that prepares it. `cgl_shapes/*` is generated locally on first use.
"""
from __future__ import annotations

import collections
import functools
import itertools
import math
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

Batch = dict[str, np.ndarray]

AUGMENTATIONS = ('random_resized_crop', 'pad_crop', 'none')
EVAL_CROPS = ('center', 'none')
CROP_AREA_RANGE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
CROP_MAX_ATTEMPTS = 10  # then the whole image, as tf's sampler does
EVAL_RESIZE_RATIO = 256 / 224  # Resize(256) → CenterCrop(224)
PAD_CROP_PADDING = 4
LOCAL_DATASET_PREFIX = 'cgl_shapes'  # generated locally, never downloaded

# Salts that keep the seeds of the different random streams apart.
_SHUFFLE_SALT, _AUGMENT_SALT = 1, 2


@functools.cache
def _tf():
  """TensorFlow, imported on first use (dissection needs only `normalization`) and kept off the
  accelerators: JAX owns their memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):  # TF already initialised, or no such device type
      pass
  return tf


def normalization(dataset_config) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std), float32 [3], on the 0–255 scale: the model sees (x − mean) / std."""
  mean = np.asarray(dataset_config.mean, np.float32)
  std = np.asarray(dataset_config.std, np.float32)
  if mean.shape != (3,) or std.shape != (3,):
    raise ValueError(f'dataset.mean and dataset.std need 3 values (RGB); got mean '
                     f'{tuple(dataset_config.mean)}, std {tuple(dataset_config.std)}')
  if np.any(std <= 0):
    raise ValueError(f'dataset.std must be > 0, got {tuple(dataset_config.std)}')
  if np.max(mean) <= 1.0 and np.max(std) <= 1.0:
    raise ValueError(f'dataset.mean {tuple(dataset_config.mean)} and dataset.std '
                     f'{tuple(dataset_config.std)} look like the 0–1 scale; give them on the '
                     '0–255 scale (e.g. mean 0.485 → 123.675)')
  return mean, std


def _missing_dataset_message(name: str, builder) -> str:
  root = str(builder.data_dir_root)
  message = (f"Dataset '{name}' is not prepared in data_dir '{root}' (no {builder.data_dir}). "
             'Nothing is downloaded unless config.dataset.download=True. ')
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if manual:
    manual_dir = f'{root}/downloads/manual'
    message += (f'It needs a manual download first:\n{textwrap.dedent(manual).strip()}\n'
                f'Put those files in '
                f'{manual_dir}, then run:\n  tfds build {name} --data_dir={root} '
                f'--manual_dir={manual_dir}')
  else:
    message += f'Prepare it with:\n  tfds build {name} --data_dir={root}'
  return message


def _prepared_builder(dataset_config):
  """The tfds builder of `dataset_config.name`, prepared, or a fast, explicit error.

  Never touches the network unless `dataset_config.download` is set: tfds (this version) keeps
  GCS off unless asked (`try_gcs`), so building a builder and asking `is_prepared()` only reads
  `data_dir`; the network is only reached by `download_and_prepare()` (which `tfds.load` calls
  by default, with minutes of retries when offline), and we call it only when asked or for the
  locally generated `cgl_shapes`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _tf()
  name = dataset_config.name
  if name.startswith(LOCAL_DATASET_PREFIX):
    try:
      from cgl_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as error:
      raise ImportError(f"dataset '{name}' needs cgl_jax.data.shapes_tfds, which failed to "
                        f'import: {error}') from error
  try:
    builder = tfds.builder(name, data_dir=dataset_config.data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f"Unknown tfds dataset '{name}' (config.dataset.name); known here: "
                     "cifar10, cifar100, places365_small, imagenet2012, cgl_shapes/binary, "
                     f"cgl_shapes/classes45 and any other tfds name. tfds says: "
                     f'{str(error).splitlines()[0]}') from None
  if not builder.is_prepared():
    if dataset_config.download or name.startswith(LOCAL_DATASET_PREFIX):
      builder.download_and_prepare()
    else:
      raise FileNotFoundError(_missing_dataset_message(name, builder))
  return builder


def num_examples(dataset_config, split: str) -> int:
  """Number of examples in `split` (a tfds split string, slices allowed) of the dataset."""
  return _split_size(_prepared_builder(dataset_config), split)


def _split_size(builder, split) -> int:
  """Examples in `split`: from the dataset info, else (splits not recorded, e.g. under
  `tfds.testing.mock_data`) from the reader's cardinality."""
  if isinstance(split, str):
    try:
      return int(builder.info.splits[split].num_examples)
    except KeyError:
      pass
  cardinality = int(_read(builder, split).cardinality())
  if cardinality < 0:
    raise ValueError(f"Split '{split}' of '{builder.name}' has unknown size; recorded splits: "
                     f'{sorted(builder.info.splits)}')
  return cardinality


def _read(builder, split):
  """The split's examples in file order, images still encoded (decoded after any skip)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return builder.as_dataset(split=split, shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(add_tfds_id=False))


def _stream_seed(seed: int, process_index: int, salt: int) -> int:
  """A 31-bit seed for one random stream of one process, well mixed from its parts."""
  return int(np.random.SeedSequence([seed, process_index, salt]).generate_state(1)[0] >> 1)


def _decode_and_crop(image_bytes, crop_window_fn):
  """Decodes an encoded image and crops the window `crop_window_fn(shape)` returns.

  JPEGs are cropped while decoding (only the window is decoded); other formats are decoded
  whole and then cropped. Window: int32 [offset_y, offset_x, height, width].
  """
  tf = _tf()

  def jpeg():
    window = crop_window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    window = crop_window_fn(tf.shape(image))
    return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def _random_crop_window(shape, seed):
  """RandomResizedCrop's window: area ∈ CROP_AREA_RANGE, aspect ∈ CROP_ASPECT_RATIO_RANGE."""
  tf = _tf()
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
      area_range=CROP_AREA_RANGE, max_attempts=CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _center_crop_window(shape, image_size: int):
  """The square kept by Resize(image_size·256/224) + CenterCrop(image_size), in input pixels."""
  tf = _tf()
  height, width = shape[0], shape[1]
  resize_size = round(image_size * EVAL_RESIZE_RATIO)
  side = tf.cast(tf.math.round(tf.cast(tf.minimum(height, width), tf.float32) * image_size /
                               resize_size), tf.int32)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _resize(image, image_size: int):
  """float32 [image_size, image_size, 3] (bilinear, antialiased; a no-op at the right size)."""
  tf = _tf()
  image = tf.cast(image, tf.float32)
  same = tf.reduce_all(tf.shape(image)[:2] == image_size)
  resized = tf.cond(same, lambda: image,
                    lambda: tf.image.resize(image, (image_size, image_size), antialias=True))
  return tf.ensure_shape(resized, (image_size, image_size, 3))


def preprocess_options(dataset_config) -> dict[str, Any]:
  """`_preprocess`'s keyword arguments from `config.dataset`, checked (errors name the key)."""
  augment = dataset_config.augment
  eval_crop = dataset_config.get('eval_crop', None)
  if eval_crop is None:
    eval_crop = 'center' if augment == 'random_resized_crop' else 'none'
  if eval_crop not in EVAL_CROPS:
    raise ValueError(f'dataset.eval_crop must be one of {EVAL_CROPS} or None (the '
                     f"augmentation's own), got {eval_crop!r}")
  pad_value = np.broadcast_to(np.asarray(dataset_config.get('pad_value', 0), np.float32), (3,))
  if not np.all((pad_value >= 0) & (pad_value <= 255)):
    raise ValueError(f'dataset.pad_value must be one value or 3 (RGB) in [0, 255], got '
                     f'{dataset_config.get("pad_value", 0)!r}')
  return dict(augment=augment, image_size=dataset_config.image_size, eval_crop=eval_crop,
              pad_value=tuple(float(v) for v in pad_value))


def _pad(image, padding: int, pad_value):
  """float32 [H, W, 3] → [H + 2p, W + 2p, 3], the border filled with `pad_value` (RGB)."""
  tf = _tf()
  paddings = [[padding] * 2, [padding] * 2, [0, 0]]
  return tf.pad(image - pad_value, paddings) + pad_value


def _preprocess(image_bytes, seed, *, augment: str, train: bool, image_size: int, mean, std,
                eval_crop: str = 'center', pad_value=(0.0, 0.0, 0.0)):
  """Encoded image → float32 [image_size, image_size, 3], augmented when `train`, normalised.

  `eval_crop` ('center' | 'none') is the evaluation transform, `pad_value` pad_crop's border
  (`preprocess_options` sets both from the config).
  """
  tf = _tf()
  if train and augment == 'random_resized_crop':
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _decode_and_crop(image_bytes, lambda shape: _random_crop_window(shape, crop_seed))
    image = tf.image.stateless_random_flip_left_right(_resize(image, image_size), flip_seed)
  elif not train and eval_crop == 'center':
    image = _resize(_decode_and_crop(
        image_bytes, lambda shape: _center_crop_window(shape, image_size)), image_size)
  else:
    image = _resize(tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
                    image_size)
    if train and augment == 'pad_crop':
      crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
      padded = _pad(image, PAD_CROP_PADDING, tf.constant(pad_value, tf.float32))
      image = tf.image.stateless_random_crop(padded, (image_size, image_size, 3), crop_seed)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return (image - mean) / std


def _check_split_args(dataset_config, *, batch_size: int, process_index: int,
                      process_count: int, start_step: int, train: bool) -> None:
  if dataset_config.augment not in AUGMENTATIONS:
    raise ValueError(f"dataset.augment must be one of {AUGMENTATIONS}, got "
                     f"'{dataset_config.augment}'")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} (global) must be a positive multiple of the '
                     f'process count {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if train and not dataset_config.shuffle_buffer > 0:
    raise ValueError(f'dataset.shuffle_buffer must be > 0, got {dataset_config.shuffle_buffer}')
  if start_step < 0 or (start_step and not train):
    raise ValueError(f'start_step must be >= 0, and 0 for evaluation; got {start_step} '
                     f'(train={train})')


def create_split(dataset_config, *, split: str, train: bool, batch_size: int, seed: int,
                 start_step: int = 0, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """Numpy batches of this process's share of `split`.

  Args:
    dataset_config: `config.dataset` (name, data_dir, download, image_size, augment, mean, std,
      shuffle_buffer).
    split: tfds split (e.g. 'train', 'validation', 'test', 'train[:90%]').
    train: shuffle, augment, repeat forever and drop the remainder; else one ordered pass.
    batch_size: GLOBAL batch size; each process gets b = batch_size // process_count rows.
    seed: the data seed (shuffling and augmentation).
    start_step: first step of a resumed run (train only): the iterator then yields the batches
      an uninterrupted iterator yields from its `start_step`-th batch on.
    process_index, process_count: this process and the number of processes (default: jax's).

  Returns:
    An iterator of {'image': float32 [b, S, S, 3] normalised, 'label': int32 [b]}. For
    evaluation also 'mask': bool [b], False on the zero padding that fills the last batches;
    every process yields the same number of batches (ceil(ceil(N / P) / b)), so multi-host
    evaluation steps stay in lockstep, and the real rows cover each example exactly once.

  Raises:
    FileNotFoundError: the dataset is not prepared and downloading is off (names the command).
    ValueError: bad arguments or config values.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  _check_split_args(dataset_config, batch_size=batch_size, process_index=process_index,
                    process_count=process_count, start_step=start_step, train=train)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = _tf()
  local_batch = batch_size // process_count
  builder = _prepared_builder(dataset_config)
  shard = tfds.even_splits(split, n=process_count, drop_remainder=train)[process_index]
  source = _read(builder, shard).map(lambda ex: {'image': ex['image'], 'label': ex['label']})
  mean, std = normalization(dataset_config)
  preprocess = functools.partial(_preprocess, train=train, mean=mean, std=std,
                                 **preprocess_options(dataset_config))
  if train:
    ds = _train_stream(source, local_batch=local_batch, start_step=start_step,
                       shuffle_buffer=dataset_config.shuffle_buffer,
                       shuffle_seed=_stream_seed(seed, process_index, _SHUFFLE_SALT),
                       augment_seed=_stream_seed(seed, process_index, _AUGMENT_SALT),
                       preprocess=preprocess, name=dataset_config.name, split=split)
  else:
    total = _split_size(builder, split)
    ds = _eval_stream(source, local_batch=local_batch,
                      num_batches=math.ceil(math.ceil(total / process_count) / local_batch),
                      image_size=dataset_config.image_size, preprocess=preprocess)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds))


def _train_stream(source, *, local_batch: int, start_step: int, shuffle_buffer: int,
                  shuffle_seed: int, augment_seed: int, preprocess, name: str, split: str):
  """Epochs of `source`, each shuffled with its own seed, from batch `start_step` on."""
  tf = _tf()
  shard_size = int(source.cardinality())
  if shard_size < 0:
    raise ValueError(f"Split '{split}' of '{name}' has unknown size (tf.data cardinality "
                     f'{shard_size}); cannot compute epoch boundaries to resume from')
  if shard_size < local_batch:
    raise ValueError(f"Split '{split}' of '{name}' has {shard_size} examples per process, "
                     f'fewer than the per-process batch {local_batch}')
  first_example = start_step * local_batch
  first_epoch, skip = divmod(first_example, shard_size)

  def epoch(index):
    # A full-range int64 seed per epoch (tf's stateless_fold_in would keep the first word).
    epoch_seed = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(shuffle_seed, tf.int64), index]), dtype=tf.int64,
        minval=None, maxval=None)
    return source.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch)
  ds = ds.skip(skip).enumerate(start=first_example)

  def augment(position, example):
    seed = tf.stack([tf.constant(augment_seed, tf.int64), position])
    return {'image': preprocess(example['image'], seed),
            'label': tf.cast(example['label'], tf.int32)}

  return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(local_batch,
                                                                      drop_remainder=True)


def _eval_stream(source, *, local_batch: int, num_batches: int, image_size: int, preprocess):
  """One ordered pass, padded with masked zero images to `num_batches` full batches."""
  tf = _tf()
  unused_seed = tf.zeros([2], tf.int64)
  real = source.map(lambda ex: {'image': preprocess(ex['image'], unused_seed),
                                'label': tf.cast(ex['label'], tf.int32),
                                'mask': tf.constant(True)},
                    num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros((image_size, image_size, 3), tf.float32),
      'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}).repeat()
  return real.concatenate(padding).take(num_batches * local_batch).batch(local_batch)


def _put(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """This process's rows → global jax.Arrays laid out by `sharding` (e.g. P('data'))."""
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in batch.items()}


def prefetch_to_device(batches: Iterable[Mapping[str, np.ndarray]], size: int,
                       sharding: jax.sharding.Sharding) -> Iterator[dict[str, jax.Array]]:
  """Yields the batches as sharded global arrays, keeping `size` transfers in flight.

  Device transfers are asynchronous, so while the accelerator runs step k, batches k+1 … k+size
  are already being copied. With several processes each contributes its local rows
  (`jax.make_array_from_process_local_data`); the global batch is their concatenation.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}')
  iterator = iter(batches)
  queue = collections.deque(_put(batch, sharding) for batch in itertools.islice(iterator, size))
  while queue:
    yield queue.popleft()
    queue.extend(_put(batch, sharding) for batch in itertools.islice(iterator, 1))
