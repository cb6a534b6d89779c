"""How a dissection measures: named presets and the config fields that override them.

`config.dissect.measurement` names a preset; each of the fields below left at None takes the
preset's value, any other value overrides it:

  field           netdissect_lite   authors_synthetic   authors_synthetic_pillow7
  upsampling      'bilinear'        'nearest'           'bicubic'
  image_format    'png'             'jpeg'              'jpeg'
  probe_split     'validation'      'all'               'all'
  iou_thresholds  (0.04,)           (0.08, 0.04)        (0.08, 0.04)

`netdissect_lite` (the default) is Network Dissection as NetDissect-Lite computes it: activation
maps upsampled with PIL's BILINEAR filter (its ``scipy.misc.imresize(..., mode='F')``), detectors
at IoU ≥ 0.04; the shapes data are probed on their validation split, stored losslessly.

`authors_synthetic` is what the CGL authors' fork of NetDissect-Lite does on the synthetic shapes
data (their ``custom_data`` branch): it resizes maps with ``Image.fromarray(map).resize(size)``,
i.e. PIL's default resample, which is NEAREST before Pillow 7.0 (their code also needs
``scipy.misc.imread``, gone since SciPy 1.2, so an older Pillow is the likely one) and BICUBIC
from Pillow 7.0 on — `authors_synthetic_pillow7`. Their probe set is every image of the data set
(train and validation, 28,800 at full size) written as JPEG (OpenCV's default quality 95), and
their report counts detectors at IoU ≥ 0.08, the first threshold here (0.04 is reported too).

The remaining fields are not part of a preset: `categories` (None: all of the probe set's) picks
the concept categories, e.g. NetDissect-Lite's default leaves out ``material`` of Broden.
`image_format` and `probe_split` describe the shapes data's Broden export; a probe set given as
`config.dissect.broden_dir` is probed whole, as it is.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cgl_jax.dissect import tally

PRESETS: dict[str, dict[str, Any]] = {
    'netdissect_lite': dict(upsampling='bilinear', image_format='png', probe_split='validation',
                            iou_thresholds=(0.04,)),
    'authors_synthetic': dict(upsampling='nearest', image_format='jpeg', probe_split='all',
                              iou_thresholds=(0.08, 0.04)),
    'authors_synthetic_pillow7': dict(upsampling='bicubic', image_format='jpeg',
                                      probe_split='all', iou_thresholds=(0.08, 0.04)),
}
CHOICES = {
    'upsampling': tally.UPSAMPLING,
    'image_format': ('png', 'jpeg'),
    'probe_split': ('validation', 'all'),
}


def resolve(settings: Mapping[str, Any]) -> dict[str, Any]:
  """The effective measurement of `config.dissect` (JSON-ready; recorded in summary.json).

  Returns:
    {'preset', 'upsampling', 'image_format', 'probe_split', 'iou_thresholds' (list),
     'categories' (list, or None for all)}.

  Raises:
    ValueError: naming the config key, what is allowed and what was given.
  """
  name = settings.get('measurement', None) or 'netdissect_lite'
  if name not in PRESETS:
    raise ValueError(f'config.dissect.measurement must be one of {tuple(PRESETS)}; '
                     f'got {name!r}')
  chosen = {'preset': name}
  for key, default in PRESETS[name].items():
    value = settings.get(key, None)
    chosen[key] = default if value is None else value
  for key, allowed in CHOICES.items():
    if chosen[key] not in allowed:
      raise ValueError(f'config.dissect.{key} must be one of {allowed} (or None: the '
                       f'{name!r} preset\'s {PRESETS[name][key]!r}); got {chosen[key]!r}')
  thresholds = chosen['iou_thresholds']
  if (isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence)
      or not thresholds or any(not 0 < t <= 1 for t in thresholds)):
    raise ValueError(f'config.dissect.iou_thresholds must be non-empty values in (0, 1]; got '
                     f'{thresholds!r}')
  chosen['iou_thresholds'] = [float(t) for t in thresholds]
  categories = settings.get('categories', None)
  if categories is not None and (isinstance(categories, str) or not categories):
    raise ValueError('config.dissect.categories must be a non-empty sequence of category names '
                     f'(None: all); got {categories!r}')
  chosen['categories'] = None if categories is None else list(categories)
  return chosen
