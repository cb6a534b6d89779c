"""How to dissect: `DissectionSettings` (the fields of `config.dissect`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from cgl_jax.dissect import measurement as measurement_lib

PROBE_CACHES = ('auto', 'none', 'device')


@dataclasses.dataclass(frozen=True)
class DissectionSettings:
  """How to dissect (the fields of `config.dissect`, plus the model's input normalisation).

  Attributes:
    layers: sown conv layers to dissect (any order; results come in forward order).
    mean, std: the model's input normalisation, RGB on the 0–255 scale.
    quantile: T_k is the top-`quantile` activation of unit k over the probe set.
    exact_quantile: exact T_k (two streaming passes) or one pass within 2^-8 relative error.
    iou_thresholds: IoU thresholds at which detectors are counted; the first one defines the
      detectors of the bar graphs, concept groups and the report's highlighting.
    batch_size: probe images per forward pass.
    image_size: side of the (square) images fed to the model.
    top_images: images kept per unit for its image strip.
    num_groups: concept groups per layer (config.cgl.num_groups); None: no groups.
    upsampling: PIL's filter resizing the maps to the segmentation size, 'bilinear' |
      'nearest' | 'bicubic' (`tally.upsample`).
    categories: the concept categories to use (None: all of the probe set's).
    probe_cache: 'none' streams the probe set from its files in every pass; 'device' reads and
      decodes it once and keeps it on the device for all passes; 'auto' (default) is 'device'
      on a GPU or TPU for probe sets up to `probe.DEVICE_CACHE_BYTES` as batches, else 'none'.
      The results are the same.
    measurement: the preset these settings follow, and `image_format`, `probe_split` how the
      shapes probe set was exported (`measurement.resolve`); recorded in summary.json.

  Raises:
    ValueError: a setting out of range (named as its `config.dissect` key).
  """
  layers: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  quantile: float = 0.005
  exact_quantile: bool = True
  iou_thresholds: tuple[float, ...] = (0.04,)
  batch_size: int = 64
  image_size: int = 64
  top_images: int = 10
  num_groups: int | None = None
  upsampling: str = 'bilinear'
  categories: tuple[str, ...] | None = None
  probe_cache: str = 'auto'
  measurement: str | None = None
  image_format: str | None = None
  probe_split: str | None = None

  def __post_init__(self):
    # Frozen: sequences become tuples (hashable, not shared with the caller).
    object.__setattr__(self, 'layers', tuple(self.layers))
    object.__setattr__(self, 'iou_thresholds', tuple(self.iou_thresholds))
    object.__setattr__(self, 'mean', tuple(float(m) for m in np.ravel(self.mean)))
    object.__setattr__(self, 'std', tuple(float(s) for s in np.ravel(self.std)))
    if self.categories is not None:
      object.__setattr__(self, 'categories', tuple(self.categories))
    if self.upsampling not in measurement_lib.CHOICES['upsampling']:
      raise ValueError(f'config.dissect.upsampling must be one of '
                       f'{measurement_lib.CHOICES["upsampling"]}; got {self.upsampling!r}')
    if self.probe_cache not in PROBE_CACHES:
      raise ValueError(f'config.dissect.probe_cache must be one of {PROBE_CACHES}; got '
                       f'{self.probe_cache!r}')
    if not self.layers:
      raise ValueError('config.dissect.layers is empty: name the conv layers to dissect')
    if not self.iou_thresholds or any(not 0 < t <= 1 for t in self.iou_thresholds):
      raise ValueError(f'config.dissect.iou_thresholds must be non-empty values in (0, 1]; got '
                       f'{self.iou_thresholds}')
    for key in ('batch_size', 'top_images', 'image_size'):
      value = getattr(self, key)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'config.dissect.{key} must be a positive integer, got {value!r}')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> DissectionSettings:
    """The settings of a run's config: `config.dissect`, the dataset's normalisation and image
    size (unless `config.dissect.image_size` is set) and `config.cgl.num_groups`."""
    from cgl_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (tensorflow)
    mean, std = input_pipeline.normalization(config.dataset)
    dissect = config.dissect
    chosen = measurement_lib.resolve(dissect)
    return cls(layers=tuple(dissect.layers), mean=tuple(mean), std=tuple(std),
               quantile=dissect.quantile, exact_quantile=dissect.exact_quantile,
               iou_thresholds=tuple(chosen['iou_thresholds']), batch_size=dissect.batch_size,
               image_size=dissect.image_size or config.dataset.image_size,
               top_images=dissect.top_images, num_groups=config.cgl.num_groups,
               upsampling=chosen['upsampling'], categories=chosen['categories'],
               probe_cache=dissect.get('probe_cache', 'auto'),
               measurement=chosen['preset'], image_format=chosen['image_format'],
               probe_split=chosen['probe_split'])

  def measurement_record(self, categories: Sequence[str]) -> dict:
    """summary.json's 'measurement': how these settings measure, with the `categories` used."""
    return {'preset': self.measurement, 'upsampling': self.upsampling,
            'image_format': self.image_format, 'probe_split': self.probe_split,
            'iou_thresholds': list(self.iou_thresholds), 'categories': list(categories)}
