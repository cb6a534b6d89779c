"""Per-run diagnostics that say what the CGL regularizers did to a trained network.

From a run's dissection (`dissect.DissectionResult`, per layer):
  dead units         units whose pre-activation is never positive on the probe set (their
                     maximum over every probe image and position is ≤ 0), so ReLU silences them;
  background share   per unit, the share of its above-threshold pixels (the dissection's
                     upsampled masks M_ik = A_ik > T_k) that lie on the background:
                     1 − Σ_{l ∈ object labels} both[k, l] / units[k], with "object labels" a
                     category covering every object pixel exactly once (colour on the shapes
                     data); "background units" have a share > 0.5.

From the run's weights:
  group norms        β_g = ‖W_g‖_F of each filter group of each conv layer
                     (`losses.group_relevance`), and their relative change against another set
                     of weights (initialisation, or the seed-paired weight-decay run):
                     ‖β − β_ref‖₂ / ‖β_ref‖₂.

From the run's soft masks on a set of images (`mask_statistics`):
  group distance     the mean soft Jaccard distance between the filters of a group over ALL
                     ordered pairs (`losses.group_coherence(pairs='exact')`), averaged over the
                     groups and the config's CGL layers: L_g / G with exact pairs;
  L_s                `losses.spatial_concentration`, as training computes it.
Both are averaged over batches of the images (ψ normalises by the batch's standard deviation).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cgl_jax import losses, models, regularize, tree_util

BACKGROUND_UNIT_SHARE = 0.5  # a unit with more of its masks on the background counts as one


def dead_units(top_maps: np.ndarray) -> np.ndarray:
  """bool [C]: units never positive on the probe set.

  Args:
    top_maps: float [C, k, h, w], each unit's maps on its top images by maximum activation
      (`dissect.LayerResult.top_maps`); map 0 holds the unit's maximum over the probe set.
  """
  top_maps = np.asarray(top_maps)
  if top_maps.ndim != 4 or top_maps.shape[1] < 1:
    raise ValueError(f'top_maps must be [C, k >= 1, h, w]; got shape {top_maps.shape}')
  return np.max(top_maps[:, 0], axis=(1, 2)) <= 0


def background_share(units: np.ndarray, both: np.ndarray,
                     object_labels: Sequence[int]) -> np.ndarray:
  """float [C]: the share of each unit's above-threshold pixels on the background.

  Args:
    units: int [C], Σ_i |M_ik| (`TallyCounts.units`).
    both: int [C, L], Σ_i |M_ik ∩ L_il| (`TallyCounts.both`).
    object_labels: label ids that together cover every object pixel exactly once.

  Returns:
    1 − Σ_{l ∈ object_labels} both[k, l] / units[k]; NaN for a unit with no such pixel.
  """
  units = np.asarray(units, np.float64)
  both = np.asarray(both, np.float64)
  labels = list(object_labels)
  if not labels:
    raise ValueError('object_labels is empty: name the labels that cover the objects')
  if max(labels) >= both.shape[1] or min(labels) < 1:
    raise ValueError(f'object_labels must be label ids in [1, {both.shape[1]}); got {labels}')
  on_objects = both[:, labels].sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(units > 0, 1 - on_objects / units, np.nan)


def category_labels(label_categories: np.ndarray, category: int) -> list[int]:
  """The label ids whose primary category index (`Broden.primary_category_index`) is given."""
  return [int(i) for i in np.flatnonzero(np.asarray(label_categories) == category)]


def group_norms(params: Mapping[str, Any], conv_layers: Iterable, num_groups: int
                ) -> dict[str, np.ndarray]:
  """{layer: float [G]} β_g = ‖W_g‖_F of every conv layer's filter groups."""
  return {layer.name: np.asarray(losses.group_relevance(
      jnp.asarray(tree_util.lookup(params, layer.kernel_path, what='params')), num_groups))
      for layer in conv_layers}


def relative_change(values: np.ndarray, reference: np.ndarray) -> float:
  """‖values − reference‖₂ / ‖reference‖₂."""
  values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  if values.shape != reference.shape:
    raise ValueError(f'shapes differ: {values.shape} vs reference {reference.shape}')
  return float(np.linalg.norm(values - reference) / np.linalg.norm(reference))


def exact_pairs_config(cgl_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cgl_config` with every ordered pair of a group in L_g (pairs='exact')."""
  exact = ml_collections.ConfigDict(cgl_config.to_dict())
  exact.pairs = 'exact'
  return exact


def make_mask_statistics(model, cgl_config: ml_collections.ConfigDict):
  """jit(variables, images [B, S, S, 3] normalised) → {'group_distance', 'l_s'} of one batch."""
  exact = exact_pairs_config(cgl_config)
  conv_layers = model.conv_layers()

  @jax.jit
  def statistics(variables, images):
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    terms = regularize.cgl_terms(exact, params=variables['params'],
                                 intermediates=models.get_intermediates(state),
                                 conv_layers=conv_layers, key=jax.random.key(0),
                                 batch_stats=variables.get('batch_stats'), terms=('l_g', 'l_s'))
    return {'group_distance': terms['l_g'] / exact.num_groups, 'l_s': terms['l_s']}

  return statistics


def mask_statistics(model, variables, images: np.ndarray, cgl_config: ml_collections.ConfigDict,
                    *, batch_size: int) -> dict[str, float]:
  """Group distance (exact pairs) and L_s of `variables` averaged over batches of `images`.

  Args:
    model, variables: a `cgl_jax.models` model and its variables.
    images: float [N, S, S, 3], normalised as the model's input; the last N mod batch_size
      images are left out (ψ depends on the batch).
    cgl_config: `config.cgl` (layers, num_groups, p1/p2, reduction, bn_mask).
    batch_size: images per batch.
  """
  batches = len(images) // batch_size
  if batches < 1:
    raise ValueError(f'mask_statistics needs at least batch_size={batch_size} images; got '
                     f'{len(images)}')
  statistics = make_mask_statistics(model, cgl_config)
  totals = {'group_distance': 0.0, 'l_s': 0.0}
  for index in range(batches):
    values = jax.device_get(statistics(
        variables, images[index * batch_size:(index + 1) * batch_size]))
    for name in totals:
      totals[name] += float(values[name]) / batches
  return totals


def dissection_units(result, object_labels: Sequence[int]) -> dict[str, dict[str, Any]]:
  """{layer: {'units', 'dead', 'background_units', 'background_share_median'}} of a dissection
  (`dissect.DissectionResult`); counts are numbers of units."""
  out = {}
  for name, layer in result.layers.items():
    dead = dead_units(layer.top_maps)
    share = background_share(layer.counts.units, layer.counts.both, object_labels)
    out[name] = {'units': int(layer.num_units), 'dead': int(dead.sum()),
                 'background_units': int(np.sum(np.nan_to_num(share, nan=0.0)
                                                > BACKGROUND_UNIT_SHARE)),
                 'background_share_median': (float(np.nanmedian(share))
                                             if np.any(np.isfinite(share)) else None)}
  return out
