"""A straightforward NumPy Network Dissection, written the way NetDissect-Lite does it.

Kept as an independent check of `tally.py`/`quantile.py` (tests) and as the baseline of
``experiments/bench_dissect.py``: it stores every activation of the probe set ([N, C, h, w], as
the reference's float memmaps), takes the per-unit quantile with `numpy.quantile` over all of it,
and tallies image by image and unit by unit, upsampling each map with PIL (bilinear by default:
what the reference's ``scipy.misc.imresize(..., mode='F')`` calls). Slow and memory-hungry by
design.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from cgl_jax.dissect.tally import TallyCounts


def thresholds(features: np.ndarray, quantile: float) -> np.ndarray:
  """Per-unit (1 − quantile) quantile of features [N, C, h, w] over images and positions."""
  per_unit = np.moveaxis(np.asarray(features, np.float32), 1, 0).reshape(features.shape[1], -1)
  return np.quantile(per_unit, 1 - quantile, axis=1).astype(np.float32)


PIL_RESAMPLE = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST, 'bicubic': Image.BICUBIC}


def upsample(feature_map: np.ndarray, size: tuple[int, int],
             method: str = 'bilinear') -> np.ndarray:
  """float32 [h, w] → [sh, sw] with PIL's resize of the float image (the reference's imresize
  mode 'F' for 'bilinear'; `PIL_RESAMPLE` names the filters)."""
  if feature_map.shape == tuple(size):
    return feature_map.astype(np.float32)
  image = Image.fromarray(np.asarray(feature_map, np.float32), mode='F')
  return np.asarray(image.resize((size[1], size[0]), PIL_RESAMPLE[method]), np.float32)


def tally(features: np.ndarray, unit_thresholds: np.ndarray,
          examples: Iterable[tuple[np.ndarray, np.ndarray]], *,
          category_onehot: np.ndarray, upsampling: str = 'bilinear') -> TallyCounts:
  """The reference's tally loop (maps resized with PIL's `upsampling` filter).

  Args:
    features: [N, C, h, w] activations (array or memmap), image order = `examples` order.
    unit_thresholds: [C].
    examples: per image (pixel_labels int [D, sh, sw], image_labels int [K]; 0 = none).
    category_onehot: [L, G] primary category of each label.
  """
  num_labels, num_categories = category_onehot.shape
  num_units = features.shape[1]
  counts = TallyCounts.zeros(num_units=num_units, num_labels=num_labels,
                             num_categories=num_categories)
  labels, units, units_cat, both = counts
  for image_index, (pixels, scalars) in enumerate(examples):
    scalars = [int(s) for s in np.ravel(scalars) if s > 0]
    size = pixels.shape[1:]
    for scalar in scalars:
      labels[scalar] += size[0] * size[1]
    label_count = np.bincount(pixels.ravel(), minlength=num_labels)
    label_count[0] = 0
    labels += label_count
    for unit in range(num_units):
      feature_map = features[image_index, unit]
      if feature_map.max() <= unit_thresholds[unit]:
        continue  # as the reference: also for bicubic, whose overshoot could exceed T_k
      mask = upsample(feature_map, size, upsampling) > unit_thresholds[unit]
      indexes = np.argwhere(mask)
      units[unit] += len(indexes)
      touched = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel(),
                            minlength=num_labels)
      touched[0] = 0
      category_touch = touched @ category_onehot
      both[unit] += touched
      for scalar in scalars:
        category_touch = category_touch + category_onehot[scalar]
        both[unit, scalar] += len(indexes)
      units_cat[unit] += len(indexes) * (category_touch > 0)
  return counts


def examples_from_batches(batches: Iterable[Mapping], categories) -> Iterable:
  """Broden reader batches → per-image (pixel label layers, image-level ids) for `tally`."""
  for batch in batches:
    pixel = [batch['pixel_labels'][c] for c in categories if c in batch['pixel_labels']]
    scalar = [batch['image_labels'][c] for c in categories if c in batch['image_labels']]
    for i in range(len(batch['index'])):
      layers = np.concatenate([p[i] for p in pixel]) if pixel else None
      ids = np.concatenate([s[i] for s in scalar]) if scalar else np.zeros(0, np.int64)
      yield layers, ids
