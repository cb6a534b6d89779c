"""What a dissection computes: per-layer results and `compute` (no file output).

`compute` probes a model on a Broden probe set and returns a `DissectionResult`: per layer the
thresholds T_k, IoU counts, each unit's concept and IoU, detector statistics per IoU threshold,
the concept groups and each unit's top images with its maps on them. `report.write_report` turns
a result into files. Units are numbered from 0 here; the written outputs number them from 1.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from cgl_jax import losses
from cgl_jax import tree_util
from cgl_jax.data import broden as broden_lib
from cgl_jax.dissect import probe
from cgl_jax.dissect.settings import DissectionSettings
from cgl_jax.dissect import tally as tally_lib


@dataclasses.dataclass(frozen=True)
class LayerResult:
  """One dissected layer with C units.

  Attributes:
    name: the layer.
    thresholds: float32 [C] T_k.
    max_threshold_error: bound on the relative error of T_k (0 with the exact quantile).
    map_size: (h, w) of the layer's maps.
    counts: the IoU counts.
    concepts: each unit's best concept per category and overall, with its IoU.
    detectors: `tally.detector_summary` per IoU threshold (settings order).
    groups: `tally.concept_group_rows` (units numbered from 1); [] without concept groups.
    top_images: int [C, k] probe rows with the unit's highest maxima, best first (−1: none).
    top_maps: float32 [C, k, h, w] the unit's map on each of those images.
  """
  name: str
  thresholds: np.ndarray
  max_threshold_error: float
  map_size: tuple[int, int]
  counts: tally_lib.TallyCounts
  concepts: tally_lib.UnitConcepts
  detectors: list[dict[str, Any]]
  groups: list[dict[str, Any]]
  top_images: np.ndarray
  top_maps: np.ndarray

  @property
  def num_units(self) -> int:
    return len(self.thresholds)


@dataclasses.dataclass(frozen=True)
class DissectionResult:
  """Everything a dissection found, ready to be written (`report.write_report`).

  Attributes:
    settings: the settings used.
    probe_set: the probe set's directory; `num_images` its size.
    categories: the concept categories; `label_names` the name of each label id (0: '').
    layers: {name: LayerResult} in forward order.
    rud: `ratio_of_unique_detectors` per IoU threshold.
    seconds: wall time of `compute`.
  """
  settings: DissectionSettings
  probe_set: str
  num_images: int
  categories: tuple[str, ...]
  label_names: tuple[str, ...]
  layers: dict[str, LayerResult]
  rud: list[dict[str, Any]]
  seconds: float


def compute(model, variables, data: broden_lib.Broden, settings: DissectionSettings, *,
            show_progress: bool = True) -> DissectionResult:
  """Dissects `settings.layers` of `model` (with `variables`) on the probe set `data`.

  Args:
    model: a Flax model following the `cgl_jax.models` contract (sown convs, `conv_layers()`).
    variables: its variables ({'params': …[, 'batch_stats': …]}).
    data: the probe set.
    settings: what to compute.
    show_progress: progress bars on stderr.

  Raises:
    ValueError: a layer that is not a conv layer of `model`, an empty probe set, or a
      `num_groups` larger than a layer's number of units.
  """
  start = time.perf_counter()
  probed, top_maps = probe_layers(model, variables, data, settings, show_progress=show_progress)
  return assemble(model, variables['params'], data, settings, probed, top_maps,
                  seconds=time.perf_counter() - start)


def forward_order(model, names) -> list[str]:
  """`names` without repeats, in the model's forward order (unknown names last)."""
  order = [layer.name for layer in model.conv_layers()]
  return sorted(dict.fromkeys(names),
                key=lambda name: order.index(name) if name in order else len(order))


def assemble(model, params, data: broden_lib.Broden, settings: DissectionSettings,
             probed: dict[str, probe.LayerDissection], top_maps: dict[str, np.ndarray], *,
             seconds: float) -> DissectionResult:
  """The `DissectionResult` of what the probe measured (`probe.dissect_layers`) for one model.

  Args:
    model: the model (its `conv_layers()` give the kernels of the concept groups).
    params: its `variables['params']`.
    data, settings: the probe set and settings of the dissection.
    probed: {layer: LayerDissection} in forward order.
    top_maps: {layer: float32 [C, k, h, w]} each unit's map on its top images.
    seconds: the wall time to record.
  """
  conv = {layer.name: layer for layer in model.conv_layers()}
  categories = tuple(data.categories)
  label_names = tuple(data.label_names())
  primary = data.primary_category_index(categories)
  results = {}
  for name, layer in probed.items():
    concepts = tally_lib.unit_concepts(tally_lib.iou(layer.counts, primary), primary,
                                       len(categories))
    groups = []
    if settings.num_groups:
      kernel = tree_util.lookup(params, conv[name].kernel_path, what='params')
      relevance = np.asarray(losses.group_relevance(jnp.asarray(kernel), settings.num_groups))
      groups = tally_lib.concept_group_rows(
          concepts, layer=name, num_groups=settings.num_groups, relevance=relevance,
          threshold=settings.iou_thresholds[0], categories=categories, label_names=label_names)
    results[name] = LayerResult(
        name=name, thresholds=layer.thresholds,
        max_threshold_error=float(np.max(layer.threshold_error_bound)),
        map_size=tuple(layer.map_size), counts=layer.counts, concepts=concepts,
        detectors=[tally_lib.detector_summary(concepts, threshold=t, categories=categories,
                                              label_names=label_names)
                   for t in settings.iou_thresholds],
        groups=groups, top_images=layer.top_indices, top_maps=top_maps[name])
  rud = [ratio_of_unique_detectors(list(results.values()), threshold_index=i)
         for i in range(len(settings.iou_thresholds))]
  return DissectionResult(
      settings=settings, probe_set=data.directory, num_images=len(data), categories=categories,
      label_names=label_names, layers=results, rud=rud, seconds=seconds)


def probe_layers(model, variables, data: broden_lib.Broden, settings: DissectionSettings, *,
                 show_progress: bool = True) -> tuple[dict, dict]:
  """The probe passes of `settings.layers` (in forward order) and their top images' maps.

  Returns:
    ``(probed, top_maps)``: per layer name, `probe.dissect_layers`' result and the
    activation maps of its top images (`probe.top_image_maps`).
  """
  layers = forward_order(model, settings.layers)
  probed = probe.dissect_layers(model, variables, data,
                                dataclasses.replace(settings, layers=tuple(layers)),
                                show_progress=show_progress)
  forward = probe.make_forward(model, layers=layers, mean=settings.mean, std=settings.std)
  top_maps = {}
  for name in layers:
    _, _, top_maps[name] = probe.top_image_maps(
        forward, variables, data, layer=name, top_indices=probed[name].top_indices,
        image_size=settings.image_size, batch_size=settings.batch_size)
  return probed, top_maps


def ratio_of_unique_detectors(layers: Sequence[LayerResult], *, threshold_index: int) -> dict:
  """RUD over the last two of `layers` (forward order): Σ unique detectors / Σ units, at the
  `threshold_index`-th IoU threshold."""
  last = list(layers)[-2:]
  unique = sum(layer.detectors[threshold_index]['unique_detectors'] for layer in last)
  units = sum(layer.num_units for layer in last)
  threshold = last[0].detectors[threshold_index]['iou_threshold']
  return {'iou_threshold': threshold, 'layers': [layer.name for layer in last],
          'unique_detectors': unique, 'units': units, 'rud': unique / units}

