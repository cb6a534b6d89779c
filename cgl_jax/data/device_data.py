"""The synthetic shapes dataset as device arrays, and batch orders that depend on (seed, step) only.

    splits = shapes_splits('binary', image_size=64)          # {'train': …, 'validation': …}
    order = epoch_order(seed, epoch, len(splits['train']))   # int32 [N], on the device
    rows = batch_rows(order, step % steps_per_epoch, 32)     # int32 [32]

The images are exactly those of `shapes.generate` (and so of the tfds builder `cgl_shapes`,
which writes the same bytes): 23,040 train / 5,760 validation images of 64×64×3 uint8 for the
paper's sizes (≈ 354 MB in all), small enough to keep on one device. At another `image_size` the
64-px images are resized once, bilinear with antialiasing as the tfds input pipeline does, and
rounded to uint8.

Order: epoch e of a run with seed s visits the train split in the order
`jax.random.permutation(fold_in(fold_in(key(s), DATA_SALT), e), N)`, `N // B` batches of B rows
(the remainder is dropped); step k is batch `k mod (N // B)` of epoch `k // (N // B)`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cgl_jax.data import shapes

DATA_SALT = 0x0DA7A  # keeps the data order's key apart from the other keys of a seed
DATASET_PREFIX = 'cgl_shapes/'


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceSplit:
  """One split on the device.

  Attributes:
    images: uint8 [N, S, S, 3], 0–255.
    labels: int32 [N].
  """
  images: jax.Array
  labels: jax.Array

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def generator_settings(dataset_name: str) -> tuple[str, dict]:
  """(label setting, `shapes.generate` kwargs) of a tfds name 'cgl_shapes/<config>'.

  Raises:
    ValueError: not a `cgl_shapes` name, or an unknown config (the message lists the known ones).
  """
  if not dataset_name.startswith(DATASET_PREFIX):
    raise ValueError(f"config.dataset.name must be a synthetic shapes dataset "
                     f"'{DATASET_PREFIX}<config>' to live on the device; got {dataset_name!r}")
  from cgl_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top (imports tfds)
  configs = {config.name: config for config in shapes_tfds.CglShapes.BUILDER_CONFIGS}
  name = dataset_name[len(DATASET_PREFIX):]
  if name not in configs:
    raise ValueError(f'config.dataset.name {dataset_name!r}: unknown shapes config {name!r}; '
                     f'known: {sorted(configs)}')
  return configs[name].setting, configs[name].generator_kwargs()


def resize_uint8(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] → uint8 [N, S, S, 3]: bilinear, antialiased, rounded (identity at S = H)."""
  if images.shape[1:3] == (image_size, image_size):
    return images
  resize = jax.jit(lambda x: jax.image.resize(
      x.astype(jnp.float32), (x.shape[0], image_size, image_size, x.shape[3]), 'linear',
      antialias=True))
  out = np.concatenate([np.asarray(resize(chunk)) for chunk in np.array_split(
      images, max(1, len(images) // 4096))])
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def shapes_splits(setting: str, *, image_size: int = shapes.IMAGE_SIZE, seed: int = 0,
                  images_per_class: int = 640, train_fraction: float = 0.8,
                  device: jax.Device | None = None) -> dict[str, DeviceSplit]:
  """Both splits of the shapes dataset (`shapes.generate` arguments) on `device` (default: the
  first local device), images resized to `image_size` (see the module docstring)."""
  if not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f'image_size must be a positive integer; got {image_size!r}')
  device = device or jax.local_devices()[0]
  splits = {}
  for split in shapes.SPLITS:
    examples = shapes.generate(split, setting=setting, seed=seed,
                               images_per_class=images_per_class,
                               train_fraction=train_fraction)
    images = resize_uint8(examples.images, image_size)
    splits[split] = DeviceSplit(images=jax.device_put(images, device),
                                labels=jax.device_put(examples.labels.astype(np.int32), device))
  return splits


def epoch_order(seed: jax.Array | int, epoch: jax.Array | int, num_examples: int) -> jax.Array:
  """int32 [num_examples]: the visiting order of epoch `epoch` for a run with `seed`."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DATA_SALT), epoch)
  return jax.random.permutation(key, num_examples).astype(jnp.int32)


def batch_rows(order: jax.Array, batch_in_epoch: jax.Array | int, batch_size: int) -> jax.Array:
  """int32 [batch_size]: the rows of batch `batch_in_epoch` of an epoch `order`."""
  return jax.lax.dynamic_slice(order, (batch_in_epoch * batch_size,), (batch_size,))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """N // B (the remainder is dropped); at least 1 batch must fit."""
  if batch_size < 1 or num_examples < batch_size:
    raise ValueError(f'batch size {batch_size} must be in [1, {num_examples}] (the train '
                     'split size)')
  return num_examples // batch_size
