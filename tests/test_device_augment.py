"""Device augmentation: torchvision's crop rules, PIL-style resizing, flips, padding, determinism."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgl_jax import device_augment
from cgl_jax.data import device_data, shapes

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _images(batch, size=24, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (batch, size, size, 3)).astype(np.uint8)


def _torchvision_boxes(rng, n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision.transforms.RandomResizedCrop.get_params, transcribed (numpy RNG)."""
  boxes = []
  for _ in range(n):
    for _ in range(10):
      area = height * width * rng.uniform(*scale)
      aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
      w = int(round(math.sqrt(area * aspect)))
      h = int(round(math.sqrt(area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        boxes.append((rng.randint(0, height - h + 1), rng.randint(0, width - w + 1), h, w))
        break
    else:
      boxes.append((0, 0, height, width))
  return np.asarray(boxes, np.float64)


@pytest.mark.parametrize('shape', [(64, 64), (32, 48)])
def test_crop_boxes_follow_torchvision_rules(shape):
  height, width = shape
  boxes = np.asarray(device_augment.crop_boxes(jax.random.key(0), 20_000, height, width))
  top, left, h, w = boxes.T
  assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
  assert np.all((top + h <= height) & (left + w <= width))
  # w = round(√(A·r)), h = round(√(A/r)) with A/(HW) ∈ [0.08, 1], r ∈ [3/4, 4/3]: the rounding
  # moves each side by at most ½.
  hw = height * width
  assert np.all((w - 0.5) * (h - 0.5) <= 1.0 * hw + 1e-9)
  assert np.all((w + 0.5) * (h + 0.5) >= 0.08 * hw - 1e-9)
  assert np.all((w - 0.5) / (h + 0.5) <= 4 / 3 + 1e-9)
  assert np.all((w + 0.5) / (h - 0.5) >= 3 / 4 - 1e-9)
  # The distribution equals the transcription's (20,000 draws each: means within ~4 std errors).
  reference = _torchvision_boxes(np.random.RandomState(1), 20_000, height, width)
  for ours, theirs in zip(boxes.T.astype(np.float64), reference.T):
    tolerance = 4 * math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
    assert abs(ours.mean() - theirs.mean()) <= tolerance
  # Corners are uniform over the valid positions: the relative position has mean ½.
  free = height - h
  relative = top[free > 0] / free[free > 0]
  assert abs(relative.mean() - 0.5) < 0.01


def test_crop_boxes_fall_back_to_torchvision_centre_crop():
  # No attempt can fit (area > the image): torchvision's centre fallback.
  square = device_augment.crop_boxes(jax.random.key(0), 3, 40, 40, scale=(2.0, 3.0))
  np.testing.assert_array_equal(square, [[0, 0, 40, 40]] * 3)
  wide = device_augment.crop_boxes(jax.random.key(0), 2, 20, 64, scale=(5.0, 6.0))
  # in_ratio 3.2 > 4/3: h = 20, w = round(20·4/3) = 27, centred.
  np.testing.assert_array_equal(wide, [[0, (64 - 27) // 2, 20, 27]] * 2)
  tall = device_augment.crop_boxes(jax.random.key(0), 1, 64, 20, scale=(5.0, 6.0))
  np.testing.assert_array_equal(tall, [[(64 - 27) // 2, 0, 27, 20]])


@pytest.mark.parametrize('out_size', [24, 10])
def test_resized_crop_equals_resizing_the_cropped_image(maybe_jit, out_size):
  images = _images(4)
  boxes = np.array([[3, 5, 10, 15], [0, 0, 24, 24], [10, 2, 14, 20], [7, 9, 17, 11]])
  out = maybe_jit(lambda x, b: device_augment.resized_crop(x, b, out_size))(images, boxes)
  for image, (top, left, h, w), result in zip(images, boxes, np.asarray(out)):
    crop = image[top:top + h, left:left + w].astype(np.float32)
    expected = np.asarray(jax.image.resize(crop, (out_size, out_size, 3), 'linear',
                                           antialias=True))
    # Equal after rounding, except where float rounding decides a tie at .5.
    tie = np.abs(expected - np.floor(expected) - 0.5) < 1e-3
    np.testing.assert_array_equal(result[~tie], np.round(expected)[~tie])
    assert np.all(np.abs(result - expected)[tie] <= 0.5 + 1e-3)


def test_resize_weights_ignore_pixels_outside_the_window():
  weights = np.asarray(device_augment.resize_weights(jnp.array([5]), jnp.array([4]), 20, 9))[0]
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  assert np.all(weights[:, :5] == 0) and np.all(weights[:, 9:] == 0)


def test_flip_is_an_exact_mirror():
  images = _images(3)
  boxes = jnp.array([[2, 3, 12, 17]] * 3)
  plain = device_augment.resized_crop(images, boxes, 24)
  flipped = device_augment.resized_crop(images, boxes, 24, flip=jnp.array([True, False, True]))
  np.testing.assert_array_equal(flipped[0], plain[0][:, ::-1])
  np.testing.assert_array_equal(flipped[1], plain[1])
  np.testing.assert_array_equal(flipped[2], plain[2][:, ::-1])


def test_rrc_flip_is_deterministic_and_flips_about_half(maybe_jit):
  images = _images(200, size=16)
  fn = maybe_jit(device_augment.rrc_flip)
  first = np.asarray(fn(jax.random.key(3), images))
  np.testing.assert_array_equal(first, fn(jax.random.key(3), images))
  assert not np.array_equal(first, fn(jax.random.key(4), images))
  # The same crop boxes unflipped: each output is either that or its mirror, about half mirrored.
  box_key, _ = jax.random.split(jax.random.key(3))
  boxes = device_augment.crop_boxes(box_key, 200, 16, 16)
  plain = np.asarray(device_augment.resized_crop(images, boxes, 16))
  same = np.all(first == plain, axis=(1, 2, 3))
  mirrored = np.all(first == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert 70 <= mirrored.sum() <= 130


def test_pad_crop_pads_with_the_background_and_crops_a_shifted_window(maybe_jit):
  images = _images(64, size=12)
  out = np.asarray(maybe_jit(device_augment.pad_crop_flip)(jax.random.key(0), images))
  p = device_augment.PAD_CROP_PADDING
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=255)
  offsets = set()
  for image, result in zip(padded, out):
    matches = [(dy, dx, flip) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
               for flip in (False, True)
               if np.array_equal(result, (lambda c: c[:, ::-1] if flip else c)(
                   image[dy:dy + 12, dx:dx + 12]))]
    assert matches, 'output is no padded crop of its image'
    offsets.add(matches[0][:2])
  assert len(offsets) > 20  # offsets vary
  assert device_augment.BACKGROUND == tuple(shapes.PALETTE[0])  # the shapes' white background


def test_identity_transform_equals_the_normalised_image():
  images = _images(5)
  expected = (images.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
  # (XLA may divide by multiplying with the reciprocal: 1 ulp.)
  np.testing.assert_allclose(device_augment.eval_transform(images, mean=MEAN, std=STD),
                             expected, rtol=3e-7, atol=0)
  np.testing.assert_allclose(
      device_augment.augment(jax.random.key(0), images, 'none', mean=MEAN, std=STD), expected,
      rtol=3e-7, atol=0)
  # The whole-image box resized to its own size is the image itself.
  whole = device_augment.resized_crop(images, jnp.array([[0, 0, 24, 24]] * 5), 24)
  np.testing.assert_array_equal(whole, images.astype(np.float32))


def test_unknown_augmentation_is_named():
  with pytest.raises(ValueError, match="dataset.augment must be one of .* got 'mixup'"):
    device_augment.augment(jax.random.key(0), _images(1), 'mixup', mean=MEAN, std=STD)


# ----------------------------------------------------------------------------------------------
# device_data


def test_shapes_splits_hold_the_generator_images_and_labels():
  splits = device_data.shapes_splits('classes45', images_per_class=4, train_fraction=0.5)
  for split in shapes.SPLITS:
    examples = shapes.generate(split, setting='classes45', images_per_class=4,
                               train_fraction=0.5)
    np.testing.assert_array_equal(splits[split].images, examples.images)
    np.testing.assert_array_equal(splits[split].labels, examples.labels)
    assert splits[split].images.dtype == jnp.uint8 and len(splits[split]) == 90
  small = device_data.shapes_splits('binary', image_size=32, images_per_class=4,
                                    train_fraction=0.5)['train']
  assert small.images.shape == (90, 32, 32, 3)
  big = shapes.generate('train', images_per_class=4, train_fraction=0.5).images
  reference = jax.image.resize(big.astype(np.float32), (90, 32, 32, 3), 'linear', antialias=True)
  np.testing.assert_allclose(small.images, reference, atol=0.5 + 1e-3)


def test_generator_settings_of_tfds_names():
  assert device_data.generator_settings('cgl_shapes/binary_tiny') == (
      'binary', dict(seed=0, images_per_class=10, train_fraction=0.8))
  assert device_data.generator_settings('cgl_shapes/classes45')[0] == 'classes45'
  with pytest.raises(ValueError, match="unknown shapes config 'huge'"):
    device_data.generator_settings('cgl_shapes/huge')
  with pytest.raises(ValueError, match="cgl_shapes/<config>.*'cifar10'"):
    device_data.generator_settings('cifar10')


def test_epoch_orders_are_permutations_fixed_by_seed_and_epoch():
  order = np.asarray(device_data.epoch_order(3, 1, 100))
  np.testing.assert_array_equal(np.sort(order), np.arange(100))
  np.testing.assert_array_equal(order, device_data.epoch_order(jnp.int32(3), jnp.int32(1), 100))
  assert not np.array_equal(order, device_data.epoch_order(3, 2, 100))
  assert not np.array_equal(order, device_data.epoch_order(4, 1, 100))
  steps = device_data.steps_per_epoch(100, 30)
  rows = np.concatenate([device_data.batch_rows(order, k, 30) for k in range(steps)])
  np.testing.assert_array_equal(rows, order[:90])  # the remainder (10) is dropped
  with pytest.raises(ValueError, match=r'batch size 101 must be in \[1, 100\]'):
    device_data.steps_per_epoch(100, 101)
