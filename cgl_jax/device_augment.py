"""Training augmentation on the device, vectorised over the batch, from a PRNG key.

    images = augment(key, batch_uint8, 'random_resized_crop', mean=mean, std=std)

Every function takes uint8 images [B, H, W, 3] (0–255, as stored) and works on the whole batch
at once; the random choices come from `key` only, so a batch is a function of (key, images).

Kinds (the names of `config.dataset.augment`):
- 'random_resized_crop' (`rrc_flip`, the authors' code): torchvision's
  `RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3))` then `RandomHorizontalFlip(0.5)`.
  The crop box follows torchvision's rules exactly (`crop_boxes`): up to 10 attempts of an area
  fraction uniform in `scale` and a log-uniform aspect ratio, the first box that fits the image
  wins, its corner uniform over the positions that keep it inside; when none fits, the centre
  fallback. The crop is resized to S×S with PIL's antialiased bilinear filter on the CROPPED image
  (`resize_weights`; pixels outside the box never contribute) and rounded to integers, as the
  authors' PIL pipeline stores its result in uint8.
- 'pad_crop' (`pad_crop_flip`): pad by 4 px with the BACKGROUND colour (white for the shapes
  data), a uniformly placed S×S crop, horizontal flip with p = 0.5.
- 'none': the image as is.
Evaluation (`eval_transform`) is the identity for every kind: the authors'
`Resize(64) + CenterCrop(64)` keeps a 64×64 image unchanged.

Finally every image is normalised, x ← (x − mean) / std per channel, mean and std on the 0–255
scale (`input_pipeline.normalization`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

AUGMENTATIONS = ('random_resized_crop', 'pad_crop', 'none')
CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
PAD_CROP_PADDING = 4
BACKGROUND = (255, 255, 255)  # the shapes data's background (shapes.PALETTE[0])


def crop_boxes(key: jax.Array, batch: int, height: int, width: int, *,
               scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
               attempts: int = CROP_ATTEMPTS) -> jax.Array:
  """torchvision's `RandomResizedCrop.get_params` for `batch` images of height×width.

  Per image and attempt: area = H·W·U(scale), aspect = exp(U(log ratio)),
  w = round(√(area·aspect)), h = round(√(area / aspect)) (round half to even, as Python's
  `round`); the first attempt with 0 < w ≤ W and 0 < h ≤ H gives the box, its corner
  top ~ U{0..H − h}, left ~ U{0..W − w}. With no valid attempt: the centre crop of the largest
  box whose aspect lies in `ratio` (the whole image when H/W allows it).

  Returns:
    int32 [batch, 4]: (top, left, height, width) of each box.
  """
  area_key, ratio_key, corner_key = jax.random.split(key, 3)
  area = height * width * jax.random.uniform(area_key, (batch, attempts), minval=scale[0],
                                             maxval=scale[1])
  log_ratio = jax.random.uniform(ratio_key, (batch, attempts), minval=math.log(ratio[0]),
                                 maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_ratio)
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(valid, axis=1)  # index of the first valid attempt (0 when there is none)
  any_valid = jnp.any(valid, axis=1)
  pick = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]
  fallback_h, fallback_w = _fallback_size(height, width, ratio)
  h = jnp.where(any_valid, pick(h), fallback_h)
  w = jnp.where(any_valid, pick(w), fallback_w)
  u = jax.random.uniform(corner_key, (batch, 2))
  top = jnp.minimum(jnp.floor(u[:, 0] * (height - h + 1)).astype(jnp.int32), height - h)
  left = jnp.minimum(jnp.floor(u[:, 1] * (width - w + 1)).astype(jnp.int32), width - w)
  top = jnp.where(any_valid, top, (height - h) // 2)
  left = jnp.where(any_valid, left, (width - w) // 2)
  return jnp.stack([top, left, h, w], axis=1)


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
  """(h, w) of torchvision's centre fallback."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    return int(round(width / min(ratio))), width
  if in_ratio > max(ratio):
    return height, int(round(height * max(ratio)))
  return height, width


def resize_weights(start: jax.Array, length: jax.Array, in_size: int,
                   out_size: int) -> jax.Array:
  """Row-stochastic matrices that resize the window [start, start + length) to out_size samples.

  PIL's antialiased bilinear filter applied to the cropped signal: output sample o has centre
  c = start + (o + ½)·length / out_size in input coordinates, input pixel x weighs
  max(0, 1 − |x + ½ − c| / s) with s = max(length / out_size, 1) (the filter widens when
  shrinking), only pixels inside the window count, and each row is divided by its sum.

  Args:
    start, length: int [B], the window of each signal (length ≥ 1, inside [0, in_size)).
    in_size: the length of the full input axis.
    out_size: the number of output samples.

  Returns:
    float32 [B, out_size, in_size].
  """
  start = jnp.asarray(start, jnp.float32)[:, None, None]
  length = jnp.asarray(length, jnp.float32)[:, None, None]
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32)[None, :, None] + 0.5) * scale
  x = jnp.arange(in_size, dtype=jnp.float32)[None, None, :]
  weight = jnp.maximum(0.0, 1.0 - jnp.abs(x + 0.5 - centre) / support)
  weight = jnp.where((x >= start) & (x < start + length), weight, 0.0)
  return weight / jnp.sum(weight, axis=-1, keepdims=True)


def resized_crop(images: jax.Array, boxes: jax.Array, out_size: int, *,
                 flip: jax.Array | None = None) -> jax.Array:
  """Crops `boxes` out of `images`, resizes them to out_size² and optionally mirrors them.

  Args:
    images: uint8 or float [B, H, W, C].
    boxes: int [B, 4], (top, left, height, width).
    out_size: side S of the output.
    flip: bool [B]: mirror left–right (folded into the column weights: exact).

  Returns:
    float32 [B, S, S, C], rounded to integers (the authors' PIL images are uint8).
  """
  _, height, width, _ = images.shape
  rows = resize_weights(boxes[:, 0], boxes[:, 2], height, out_size)  # [B, S, H]
  cols = resize_weights(boxes[:, 1], boxes[:, 3], width, out_size)  # [B, S, W]
  if flip is not None:
    cols = jnp.where(flip[:, None, None], cols[:, ::-1, :], cols)
  highest = jax.lax.Precision.HIGHEST  # exact enough to round 0–255 values correctly
  x = images.astype(jnp.float32)
  x = jnp.einsum('bsh,bhwc->bswc', rows, x, precision=highest)
  x = jnp.einsum('btw,bswc->bstc', cols, x, precision=highest)
  return jnp.clip(jnp.round(x), 0.0, 255.0)


def rrc_flip(key: jax.Array, images: jax.Array, out_size: int | None = None) -> jax.Array:
  """RandomResizedCrop(S) + RandomHorizontalFlip(0.5): uint8 [B, H, W, C] → float32 [B, S, S, C].

  S = out_size (default H). 0–255 scale, not normalised.
  """
  batch, height, width, _ = images.shape
  box_key, flip_key = jax.random.split(key)
  boxes = crop_boxes(box_key, batch, height, width)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
  return resized_crop(images, boxes, out_size or height, flip=flip)


def pad_crop_flip(key: jax.Array, images: jax.Array, *, padding: int = PAD_CROP_PADDING,
                  fill=BACKGROUND) -> jax.Array:
  """Pad `padding` px with the colour `fill`, random H×W crop, flip with p = 0.5.

  uint8 [B, H, W, C] → float32 [B, H, W, C] (0–255 scale, not normalised). The crop offsets
  are uniform on {0, …, 2·padding} in each direction.
  """
  batch, height, width, channels = images.shape
  offset_key, flip_key = jax.random.split(key)
  background = jnp.broadcast_to(jnp.asarray(fill, images.dtype),
                                (batch, height + 2 * padding, width + 2 * padding, channels))
  padded = jax.lax.dynamic_update_slice(background, images, (0, padding, padding, 0))
  offsets = jax.random.randint(offset_key, (batch, 2), 0, 2 * padding + 1)
  crop = jax.vmap(lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, channels)))(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
  crop = jnp.where(flip[:, None, None, None], crop[:, :, ::-1, :], crop)
  return crop.astype(jnp.float32)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """(x − mean) / std per channel, float32; mean, std [3] on the 0–255 scale."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def check_kind(kind: str) -> None:
  if kind not in AUGMENTATIONS:
    raise ValueError(f'dataset.augment must be one of {AUGMENTATIONS}; got {kind!r}')


def augment(key: jax.Array, images: jax.Array, kind: str, *, mean, std) -> jax.Array:
  """The training transform `kind` then `normalize`: uint8 [B, S, S, 3] → float32 [B, S, S, 3]."""
  check_kind(kind)
  if kind == 'random_resized_crop':
    images = rrc_flip(key, images)
  elif kind == 'pad_crop':
    images = pad_crop_flip(key, images)
  return normalize(images, mean, std)


def eval_transform(images: jax.Array, *, mean, std) -> jax.Array:
  """The evaluation transform of every kind: the image as is, normalised."""
  return normalize(images, mean, std)

