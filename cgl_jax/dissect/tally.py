"""The Network Dissection IoU tally (NetDissect-Lite's rule), batched on the accelerator.

For unit k with threshold T_k, image i and its upsampled map A_ik (to the segmentation size,
see `upsample`), the activation mask is M_ik = A_ik > T_k. Over the whole probe set the reference
counts

  labels[c]          pixels carrying label c (an image-level label counts the whole image);
  units[k]           Σ_i |M_ik|;
  both[k, c]         Σ_i |M_ik ∩ L_ic|  (an image-level label c of image i adds all of |M_ik|;
                     several label layers of a category, e.g. parts, each count);
  units_cat[k, g]    Σ_i |M_ik| · [M_ik touches a pixel label of category g in image i, or image i
                     has an image-level label of category g];

and IoU_kc = both[k, c] / (units_cat[k, g(c)] + labels[c] − both[k, c] + 1e-10) with g(c) the
label's primary category. Label id 0 means "no label" and is never counted.

Upsampling (`UPSAMPLING`), each bit-exact with PIL's resize of the float map:
  'bilinear'  NetDissect-Lite's ``scipy.misc.imresize(feature_map, (sh, sw), mode='F')``, which
              is PIL's BILINEAR (the default);
  'nearest'   PIL's NEAREST: the CGL authors' synthetic-data dissection calls
              ``Image.fromarray(feature_map).resize(size)``, whose default resample is NEAREST
              before Pillow 7.0 ...
  'bicubic'   ... and BICUBIC from Pillow 7.0 on.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IOU_EPSILON = 1e-10  # the reference's guard against 0/0
_HIGHEST = jax.lax.Precision.HIGHEST  # 0/1 operands are exact in any precision, counts are not


class TallyCounts(NamedTuple):
  """Integer counts of one layer (see the module docstring); int32 per batch, int64 summed."""
  labels: np.ndarray  # [L]
  units: np.ndarray  # [C]
  units_cat: np.ndarray  # [C, G]
  both: np.ndarray  # [C, L]

  @classmethod
  def zeros(cls, *, num_units: int, num_labels: int, num_categories: int) -> 'TallyCounts':
    return cls(np.zeros(num_labels, np.int64), np.zeros(num_units, np.int64),
               np.zeros((num_units, num_categories), np.int64),
               np.zeros((num_units, num_labels), np.int64))

  def __add__(self, other: 'TallyCounts') -> 'TallyCounts':
    return TallyCounts(*(np.asarray(a, np.int64) + np.asarray(b, np.int64)
                         for a, b in zip(self, other)))


def category_onehot(primary_category: np.ndarray, num_categories: int) -> np.ndarray:
  """float32 [L, G]: row c is the one-hot primary category of label c (all 0 where it is < 0)."""
  primary_category = np.asarray(primary_category)
  onehot = np.zeros((len(primary_category), num_categories), np.float32)
  has = primary_category >= 0
  onehot[np.flatnonzero(has), primary_category[has]] = 1
  return onehot


# PIL's resampling filters (libImaging/Resample.c): (filter(x), support at scale 1).
def _bilinear_filter(x: float) -> float:
  x = abs(x)
  return 1.0 - x if x < 1.0 else 0.0


def _bicubic_filter(x: float) -> float:
  a = -0.5  # PIL's bicubic constant
  x = abs(x)
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  if x < 2.0:
    return (((x - 5) * x + 8) * x - 4) * a
  return 0.0


_PIL_FILTERS = {'bilinear': (_bilinear_filter, 1.0), 'bicubic': (_bicubic_filter, 2.0)}
UPSAMPLING = ('bilinear', 'nearest', 'bicubic')


def resample_taps(in_size: int, out_size: int, method: str) -> tuple[np.ndarray, np.ndarray]:
  """PIL's resampling along one axis: input index int32 [out, k] and weight float64 [out, k].

  Output pixel x = Σ_j weight[x, j] · input[index[x, j]], summed in order j = 0, 1, ….

  'bilinear', 'bicubic': PIL's ImagingResample coefficients, computed in double exactly as
  Pillow does: centre c = (x + ½)·s with s = in/out, filter support σ·max(s, 1) (σ = 1 bilinear,
  2 bicubic with a = −½), taps clipped to the image, weights divided by their sum (so borders
  are clamped and downsampling averages). Unused trailing taps have weight 0.
  'nearest': PIL's nearest-neighbour scaling: index ⌊x_x⌋ where x_0 = s/2 and x_{x+1} = x_x + s
  (accumulated in double, as Pillow does), weight 1.
  """
  if method not in UPSAMPLING:
    raise ValueError(f'upsampling must be one of {UPSAMPLING}; got {method!r}')
  if in_size < 1 or out_size < 1:
    raise ValueError(f'sizes must be positive; got {in_size} -> {out_size}')
  scale = in_size / out_size
  if method == 'nearest':
    index = np.zeros((out_size, 1), np.int32)
    position = scale * 0.5
    for x in range(out_size):
      index[x, 0] = min(int(position), in_size - 1)
      position += scale
    return index, np.ones((out_size, 1), np.float64)
  kernel, base_support = _PIL_FILTERS[method]
  filterscale = max(scale, 1.0)
  support = base_support * filterscale
  ksize = int(np.ceil(support)) * 2 + 1
  index = np.zeros((out_size, ksize), np.int32)
  weight = np.zeros((out_size, ksize), np.float64)
  for x in range(out_size):
    centre = (x + 0.5) * scale
    inverse = 1.0 / filterscale
    xmin = max(int(centre - support + 0.5), 0)  # C casts truncate towards 0, as int() does
    xmax = min(int(centre + support + 0.5), in_size) - xmin
    taps = [kernel((t + xmin - centre + 0.5) * inverse) for t in range(xmax)]
    total = 0.0
    for w in taps:
      total += w
    for t, w in enumerate(taps):
      weight[x, t] = w / total if total != 0.0 else w
    index[x] = np.minimum(xmin + np.arange(ksize), in_size - 1)
  return index, weight


def _split_weights(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 weight = high + low exactly, high with ≤ 29 significant bits and low with ≤ 24: the
  products of a float32 (24 bits) with either are exact in double precision."""
  high = (weight.view(np.uint64) & ~np.uint64((1 << 24) - 1)).view(np.float64)
  return high, weight - high


def _resample_axis(maps: jax.Array, taps: tuple[np.ndarray, np.ndarray], axis: int) -> jax.Array:
  """One PIL pass along `axis` of float32 maps: Σ_j in double, in tap order, then to float32."""
  index, weight = taps
  shape = [1] * maps.ndim
  shape[axis] = index.shape[0]
  high, low = _split_weights(weight)
  total = None
  for j in range(index.shape[1]):
    values = jnp.take(maps, jnp.asarray(index[:, j]), axis=axis).astype(jnp.float64)
    # values·high and values·low are exact in double, so their sum is the correctly rounded
    # product values·weight, as Pillow computes it, also where XLA fuses a multiply and an add
    # into one fused multiply-add (which a plain values·weight + total would not survive).
    term = (values * jnp.asarray(high[:, j]).reshape(shape)
            + values * jnp.asarray(low[:, j]).reshape(shape))
    total = term if total is None else total + term
  # Round to float32 as Pillow stores each pass. reduce_precision, because XLA may drop a
  # float64 → float32 → float64 round trip between the passes (excess precision is allowed).
  return jax.lax.reduce_precision(total, exponent_bits=8, mantissa_bits=23).astype(jnp.float32)


def upsample(activations: jax.Array, size: Sequence[int], method: str = 'bilinear') -> jax.Array:
  """Resizes [b, h, w, C] maps to [b, sh, sw, C] float32 exactly as PIL resizes each map.

  Equal, bit for bit, to ``Image.fromarray(map, mode='F').resize((sw, sh), resample)`` with
  resample BILINEAR, NEAREST or BICUBIC (`resample_taps`): like Pillow, the horizontal pass runs
  first, each pass sums its taps in double precision in tap order and rounds to float32, and an
  axis whose size does not change is left alone. The exact double arithmetic matters where many
  activations equal the unit's threshold (a plateau, e.g. on a uniform background): there a
  float32 sum of interpolation weights can land one ulp off and flip `map > T_k`. On TPUs, which
  have no float64, the sums are float32 (not bit-exact).
  """
  activations = activations.astype(jnp.float32)
  _, height, width, _ = activations.shape
  if (height, width) == tuple(size):
    return activations
  exact = jax.default_backend() != 'tpu'
  with jax.enable_x64(exact):
    resized = activations
    if width != size[1]:
      resized = _resample_axis(resized, resample_taps(width, size[1], method), axis=2)
    if height != size[0]:
      resized = _resample_axis(resized, resample_taps(height, size[0], method), axis=1)
  return resized


def images_per_step(*, batch_size: int, pixels: int, num_units: int, num_labels: int,
                    budget_bytes: int | None = None) -> int:
  """Largest divisor of `batch_size` whose per-step float32 temporaries fit `budget_bytes`.

  One step holds masks [c, P, C], label one-hots [c, P, L] and per-image intersections
  [c, C, L]; with Broden's 1,198 labels a whole batch would not fit. The default budget is
  256 MiB on accelerators and 8 MiB on CPU, where steps that stay in cache are fastest
  (measured: 4–8 shapes images per step run 2.5× faster than 64).
  """
  if budget_bytes is None:
    budget_bytes = 1 << 23 if jax.default_backend() == 'cpu' else 1 << 28
  per_image = 4 * (pixels * (num_units + num_labels) + num_units * num_labels)
  fitting = max(1, budget_bytes // max(per_image, 1))
  return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fitting)


def tally_batch(activations: jax.Array, thresholds: jax.Array, pixel_labels: jax.Array,
                image_labels: jax.Array, valid: jax.Array, *, category_onehot: jax.Array,
                images_per_step: int = 1, upsampling: str = 'bilinear') -> TallyCounts:
  """The counts of one batch (pure; jit it with `images_per_step` static).

  Args:
    activations: [b, h, w, C] raw (pre-activation) maps.
    thresholds: float32 [C].
    pixel_labels: int32 [b, D, sh, sw] label ids, D label layers of all categories stacked.
    image_labels: int32 [b, K] image-level label ids, 0-padded.
    valid: bool [b]; padded images (False) contribute nothing.
    category_onehot: float32 [L, G] from `category_onehot`.
    images_per_step: images per step of the scan over the batch (a divisor of b): bounds memory.
    upsampling: how maps reach the segmentation size, one of `UPSAMPLING` (see `upsample`).

  Returns:
    int32 `TallyCounts` of this batch.
  """
  if upsampling not in UPSAMPLING:
    raise ValueError(f'upsampling must be one of {UPSAMPLING}; got {upsampling!r}')
  batch, _, _, num_units = activations.shape
  _, layers, seg_h, seg_w = pixel_labels.shape
  num_labels, num_categories = category_onehot.shape
  pixels = seg_h * seg_w
  if batch % images_per_step:
    raise ValueError(f'images_per_step={images_per_step} must divide the batch size {batch}')
  is_label = (jnp.arange(num_labels) > 0).astype(jnp.float32)  # id 0 = no label

  def one_step(carry, inputs):
    acts, pix, img, ok = inputs
    c = acts.shape[0]
    # As the reference, a map whose maximum is ≤ T_k activates nothing (bicubic overshoot could).
    fires = (jnp.max(acts, axis=(1, 2)) > thresholds) & ok[:, None]  # [c, C]
    active = (upsample(acts, (seg_h, seg_w), upsampling) > thresholds) & fires[:, None, None, :]
    active = active.reshape(c, pixels, num_units).astype(jnp.float32)
    counts = jnp.sum(active, axis=1).astype(jnp.int32)  # [c, C]
    pix_hot = jax.nn.one_hot(pix.reshape(c, layers, pixels), num_labels, dtype=jnp.float32)
    pix_hot = jnp.sum(pix_hot, axis=1) * is_label * ok[:, None, None]  # [c, P, L]
    img_hot = jnp.sum(jax.nn.one_hot(img, num_labels, dtype=jnp.float32), axis=1)
    img_hot = img_hot * is_label * ok[:, None]  # [c, L]
    both_image = jnp.einsum('ipk,ipl->ikl', active, pix_hot, precision=_HIGHEST)  # [c, C, L]
    touches = jnp.einsum('ikl,lg->ikg', both_image, category_onehot, precision=_HIGHEST) > 0
    has_image_label = jnp.einsum('il,lg->ig', img_hot, category_onehot, precision=_HIGHEST) > 0
    touches = touches | has_image_label[:, None, :]
    labels, units, units_cat, both = carry
    labels = labels + (jnp.sum(pix_hot, axis=(0, 1)) + pixels * jnp.sum(img_hot, 0)).astype(
        jnp.int32)
    units = units + jnp.sum(counts, axis=0)
    units_cat = units_cat + jnp.sum(counts[:, :, None] * touches, axis=0, dtype=jnp.int32)
    both = both + (jnp.sum(both_image, axis=0) + jnp.einsum(
        'ik,il->kl', counts.astype(jnp.float32), img_hot, precision=_HIGHEST)).astype(jnp.int32)
    return (labels, units, units_cat, both), None

  steps = batch // images_per_step
  split = lambda x: x.reshape(steps, images_per_step, *x.shape[1:])
  init = (jnp.zeros(num_labels, jnp.int32), jnp.zeros(num_units, jnp.int32),
          jnp.zeros((num_units, num_categories), jnp.int32),
          jnp.zeros((num_units, num_labels), jnp.int32))
  carry, _ = jax.lax.scan(one_step, init, tuple(map(split, (activations, pixel_labels,
                                                             image_labels, valid))))
  return TallyCounts(*carry)


# ----------------------------------------------------------------------------------------------
# From counts to concepts (numpy, once per layer).


def iou(counts: TallyCounts, primary_category: np.ndarray) -> np.ndarray:
  """float64 [C, L]: IoU_kc with the reference's union rule (0 for labels of no category)."""
  primary_category = np.asarray(primary_category)
  units_cat = np.where(primary_category[None] >= 0,
                       np.asarray(counts.units_cat)[:, np.maximum(primary_category, 0)], 0)
  both = np.asarray(counts.both, np.float64)
  return both / (units_cat + np.asarray(counts.labels)[None] - both + IOU_EPSILON)


@dataclasses.dataclass(frozen=True)
class UnitConcepts:
  """Per unit: best concept per category and overall.

  category_label: int [C, G] best label id per category; 0 (no label) where every label of the
    category has IoU 0, or the category has no labels.
  category_iou: float [C, G] its IoU.
  label: int [C] the unit's label (the category-best with the highest IoU).
  category: int [C] index of that label's category.
  score: float [C] its IoU.
  """
  category_label: np.ndarray
  category_iou: np.ndarray
  label: np.ndarray
  category: np.ndarray
  score: np.ndarray

  def is_detector(self, threshold: float) -> np.ndarray:
    return self.score >= threshold


def unit_concepts(iou_matrix: np.ndarray, primary_category: np.ndarray,
                  num_categories: int) -> UnitConcepts:
  """Each unit's best concept per category and its label, by NetDissect-Lite's rules.

  Per category the label of highest IoU (ties: the smaller id), or label 0 when all of them
  are 0 — the reference's argmax over all label ids then lands on id 0. The unit's label is the
  category-best of highest IoU; among tied categories the LAST one (the reference takes the
  first of a reversed ascending sort). So a unit that matches nothing gets label 0, score 0 and
  the last category, as in the reference's tally.csv.
  """
  primary_category = np.asarray(primary_category)
  num_units = iou_matrix.shape[0]
  category_label = np.zeros((num_units, num_categories), np.int64)
  category_iou = np.zeros((num_units, num_categories), np.float64)
  for g in range(num_categories):
    members = np.flatnonzero(primary_category == g)
    if members.size:
      best = np.argmax(iou_matrix[:, members], axis=1)
      category_iou[:, g] = iou_matrix[np.arange(num_units), members[best]]
      category_label[:, g] = np.where(category_iou[:, g] > 0, members[best], 0)
  category = num_categories - 1 - np.argmax(category_iou[:, ::-1], axis=1)
  units = np.arange(num_units)
  return UnitConcepts(category_label, category_iou, category_label[units, category], category,
                      category_iou[units, category])


def detector_summary(concepts: UnitConcepts, *, threshold: float, categories: Sequence[str],
                     label_names: Sequence[str]) -> dict:
  """Detectors of one layer at one IoU threshold (JSON-ready).

  detectors: units with IoU ≥ threshold; unique: distinct concepts among them; both also per
  category; concepts: {concept: number of detector units}.
  """
  detector = concepts.is_detector(threshold)
  per_category, unique_per_category, per_concept = {}, {}, {}
  for g, name in enumerate(categories):
    in_category = detector & (concepts.category == g)
    per_category[name] = int(in_category.sum())
    unique_per_category[name] = int(len(np.unique(concepts.label[in_category])))
  for label in concepts.label[detector]:
    per_concept[label_names[label]] = per_concept.get(label_names[label], 0) + 1
  return {'iou_threshold': threshold, 'detectors': int(detector.sum()),
          'unique_detectors': int(len(np.unique(concepts.label[detector]))),
          'detectors_per_category': per_category,
          'unique_detectors_per_category': unique_per_category,
          'detectors_per_concept': dict(sorted(per_concept.items(), key=lambda kv: -kv[1]))}


def concept_group_rows(concepts: UnitConcepts, *, layer: str, num_groups: int,
                       relevance: np.ndarray | None, threshold: float,
                       categories: Sequence[str], label_names: Sequence[str]) -> list[dict]:
  """The paper's concept groups (Fig. 4) of one layer.

  Group g holds units [g·f, (g+1)·f) with f = C // G (the remaining C − G·f units are free). Its
  dominant concept is the label most common among its detector units (IoU ≥ threshold; ties: the
  larger summed IoU), or among all its units when none detects anything; `detectors` counts the
  group's units detecting that concept. β_g = ‖W_g‖_F is the group relevance.
  """
  num_units = len(concepts.label)
  if not 1 <= num_groups <= num_units:
    raise ValueError(f'config.cgl.num_groups={num_groups} must be in 1..{num_units} '
                     f'(units of layer {layer!r})')
  size = num_units // num_groups
  detector = concepts.is_detector(threshold)
  total_relevance = float(np.sum(relevance)) if relevance is not None else None
  rows = []
  for g in range(num_groups):
    units = np.arange(g * size, (g + 1) * size)
    pool = units[detector[units]] if detector[units].any() else units
    labels = concepts.label[pool]
    candidates = np.unique(labels)
    dominant = max(candidates, key=lambda label: (np.sum(labels == label),
                                                  concepts.score[pool][labels == label].sum()))
    with_label = units[concepts.label[units] == dominant]
    rows.append({
        'layer': layer, 'group': g + 1, 'first_unit': int(units[0]) + 1,
        'last_unit': int(units[-1]) + 1, 'concept': label_names[dominant],
        'category': categories[concepts.category[with_label[0]]],
        'detectors': int(np.sum(detector[with_label])),
        'units_with_label': int(len(with_label)),
        'mean_iou': float(concepts.score[with_label].mean()),
        'relevance': float(relevance[g]) if relevance is not None else '',
        'relevance_share': (float(relevance[g]) / total_relevance
                            if relevance is not None and total_relevance else ''),
    })
  return rows
