"""Running a model over a Broden probe set: thresholds, tallies and top images per layer.

The probe streams the data set several times, always through the same jitted forward function
(so every pass sees bit-identical activations):

  passes 1..P  per-unit radix-selection histograms → exact top-q thresholds (`quantile.py`);
               pass 1 also keeps each unit's top images by maximum activation;
  last pass    upsample, threshold and tally against the concept labels (`tally.py`).

Streamed, memory is independent of the number of probe images: per layer a [C, 2^16] histogram,
the [C, L] / [C, G] counts and [C, top_images] indices. With `settings.probe_cache` 'device' (or
'auto' on an accelerator and a probe set under `DEVICE_CACHE_BYTES`) the images and labels are
read and decoded once, kept on the device as the batches the passes consume, and every pass runs
from there. All layers are probed in the same passes, each with its own thresholds and counts.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cgl_jax import models
from cgl_jax.data import broden as broden_lib
from cgl_jax.dissect import quantile as quantile_lib
from cgl_jax.dissect import tally as tally_lib
from cgl_jax.dissect.settings import DissectionSettings


class Progress:
  """A one-line progress bar on stderr with rate and ETA (a line per update when not a TTY)."""

  def __init__(self, total: int, *, description: str, unit: str = 'img', stream=None,
               min_interval_s: float = 0.5):
    self.total, self.description, self.unit = total, description, unit
    self.stream = stream or sys.stderr
    self.min_interval_s = min_interval_s
    self.done = 0
    self.start = self.last_print = time.perf_counter()
    self.interactive = getattr(self.stream, 'isatty', lambda: False)()

  def update(self, count: int) -> None:
    self.done += count
    now = time.perf_counter()
    if now - self.last_print >= self.min_interval_s or self.done >= self.total:
      self.last_print = now
      self.stream.write(self.line(now) + ('\r' if self.interactive else '\n'))
      self.stream.flush()

  def line(self, now: float | None = None) -> str:
    elapsed = (now or time.perf_counter()) - self.start
    rate = self.done / max(elapsed, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float('inf')
    width = 24
    filled = int(width * self.done / max(self.total, 1))
    return (f'{self.description} [{"#" * filled}{"." * (width - filled)}] '
            f'{self.done}/{self.total} {self.unit} {rate:.1f} {self.unit}/s '
            f'elapsed {elapsed:.0f}s ETA {eta:.0f}s')

  def close(self) -> None:
    if self.interactive:
      self.stream.write('\n')
      self.stream.flush()


@dataclasses.dataclass
class LayerDissection:
  """What the probe measured for one layer.

  thresholds: float32 [C] per-unit T_k.
  threshold_error_bound: float32 [C] (0 with the exact quantile).
  counts: the `TallyCounts`.
  top_indices: int [C, k] probe-image rows with the highest max activation, best first.
  top_values: float32 [C, k] those maxima.
  map_size: (h, w) of the layer's maps at the probe image size.
  """
  thresholds: np.ndarray
  threshold_error_bound: np.ndarray
  counts: tally_lib.TallyCounts
  top_indices: np.ndarray
  top_values: np.ndarray
  map_size: tuple[int, int]


def make_forward(model, *, layers: Sequence[str], mean: Sequence[float],
                 std: Sequence[float]) -> Callable:
  """jit(variables, uint8 images [b, H, W, 3]) → {layer: float32 [b, h, w, C] pre-activations}.

  Images are normalised as in training: (x − mean) / std on the 0–255 scale. Cached per
  (model, layers, mean, std), so repeated dissections reuse the compiled function.
  """
  return _cached_forward(model, tuple(layers), tuple(float(m) for m in np.ravel(mean)),
                         tuple(float(s) for s in np.ravel(std)))


@functools.lru_cache(maxsize=16)
def _cached_forward(model, layers, mean, std) -> Callable:
  available = [layer.name for layer in model.conv_layers()]
  unknown = [name for name in layers if name not in available]
  if unknown:
    raise ValueError(f'config.dissect.layers: {unknown} are not conv layers of '
                     f'{type(model).__name__}; its layers are {available}')
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  @jax.jit
  def forward(variables, images):
    x = (images.astype(jnp.float32) - mean) / std
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    sown = models.get_intermediates(state)
    return {name: sown[name].astype(jnp.float32) for name in layers}

  return forward


# 'auto' keeps probe sets up to this size (images + labels, as batches) on the device.
DEVICE_CACHE_BYTES = 2 << 30


def probe_set_bytes(data: broden_lib.Broden, *, batch_size: int, image_size: int,
                    categories: Sequence[str]) -> int:
  """Bytes of `data` as padded probe batches: uint8 images, int32 pixel and image labels."""
  seg_h, seg_w = data.segmentation_size()
  layers = sum(data.max_layers()[c] for c in categories) or 1
  image_labels = sum(data.max_image_labels()[c] for c in categories) or 1
  per_image = image_size * image_size * 3 + 4 * (layers * seg_h * seg_w + image_labels + 1) + 1
  return -(-len(data) // batch_size) * batch_size * per_image


def _pad(array: np.ndarray, size: int) -> np.ndarray:
  if len(array) == size:
    return array
  return np.concatenate([array, np.zeros((size - len(array),) + array.shape[1:], array.dtype)])


def stacked_labels(batch: Mapping[str, Any], categories: Sequence[str], *,
                   segmentation_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """All categories' pixel layers [b, D, sh, sw] and image-level ids [b, K] of a reader batch.

  Label ids are global over categories, so stacking keeps them apart (D, K ≥ 1: a zero layer or
  column stands in when no category has any).
  """
  size = len(batch['index'])
  pixel = [batch['pixel_labels'][c] for c in categories if c in batch['pixel_labels']]
  image = [batch['image_labels'][c] for c in categories if c in batch['image_labels']]
  pixel = (np.concatenate(pixel, axis=1) if pixel
           else np.zeros((size, 1, *segmentation_size), np.int32))
  image = np.concatenate(image, axis=1) if image else np.zeros((size, 1), np.int32)
  return pixel.astype(np.int32), image.astype(np.int32)


def _merge_top_images(values, indices, activations, rows, valid, *, k):
  """Running top-k images per unit by maximum activation (ties: the earlier image)."""
  batch_max = jnp.where(valid[:, None], jnp.max(activations, axis=(1, 2)), -jnp.inf)  # [b, C]
  all_values = jnp.concatenate([values, batch_max.T], axis=1)
  all_indices = jnp.concatenate([indices, jnp.broadcast_to(rows, batch_max.T.shape)], axis=1)
  best_values, position = jax.lax.top_k(all_values, k)
  return best_values, jnp.take_along_axis(all_indices, position, axis=1)


@functools.lru_cache(maxsize=32)
def _threshold_step(*, bits_per_pass: tuple[int, ...], pass_index: int,
                    last_pass: bool) -> Callable:
  """jit(states, activations, valid) → states: every layer's histogram update for one batch.

  One executable for all layers. It depends on the digit schedule only, not on the probe set's
  size, so dissections of any number of images share one compilation. `states` is donated
  (updated in place). The forward pass stays a separate executable shared by all passes: fused
  into each pass's step, XLA could round differently from one pass to the next, and the passes
  must see bit-identical activations.
  """
  # On CPU, cache-sized chunks (see `quantile.histogram_update`); accelerators take it whole.
  values_per_chunk = 1 << 17 if jax.default_backend() == 'cpu' else None

  def step(states, activations, valid):
    new_states = {}
    for name, state in states.items():
      maps = activations[name]  # [b, h, w, C]
      _, height, width, units = maps.shape
      new_states[name] = quantile_lib.histogram_update(
          state, maps.reshape(-1, units), jnp.repeat(valid, height * width),
          bits_per_pass=bits_per_pass, pass_index=pass_index, last_pass=last_pass,
          values_per_chunk=values_per_chunk)
    return new_states

  return jax.jit(step, donate_argnums=0)


@functools.partial(jax.jit, static_argnames='k', donate_argnums=0)
def _merge_top_images_of_layers(top, activations, rows, valid, *, k):
  """`_merge_top_images` of every layer in `top` (a separate executable: fused into the
  histogram step, XLA CPU made that step 50 ms slower per batch of 64 instead of 2 ms)."""
  return {name: _merge_top_images(*top[name], activations[name], rows, valid, k=k)
          for name in top}


@functools.lru_cache(maxsize=32)
def _tally_step(*, images_per_step: tuple[tuple[str, int], ...], upsampling: str) -> Callable:
  """jit(activations, valid, thresholds, pixel, image, category_onehot) → {layer: counts}.

  All layers' `tally.tally_batch` in one executable (`images_per_step`: (layer, steps) pairs).
  """
  steps = dict(images_per_step)

  def step(activations, valid, thresholds, pixel_labels, image_labels, category_onehot):
    return {name: tally_lib.tally_batch(
        activations[name], thresholds[name], pixel_labels, image_labels, valid,
        category_onehot=category_onehot, images_per_step=steps[name], upsampling=upsampling)
        for name in steps}

  return jax.jit(step)


def dissect_layers(model, variables, data: broden_lib.Broden, settings: DissectionSettings, *,
                   categories: Sequence[str] | None = None, show_progress: bool = True,
                   timings: dict[str, float] | None = None) -> dict[str, LayerDissection]:
  """Thresholds, IoU counts and top images of `settings.layers` on probe set `data`.

  Args:
    model, variables: a Flax model following the `cgl_jax.models` contract and its variables.
    data: the probe set.
    settings: layers, input normalisation, quantile (exact or histogram), probe batch size and
      image size, top images kept per unit, the upsampling of maps to the segmentation size
      (the other fields are not used here).
    categories: the concept categories to tally (default: all of `data`).
    show_progress: progress bars on stderr.
    timings: if given, receives each pass's wall seconds ('pass 1 (thresholds)', …), waited
      for before the clock stops (for benchmarks).

  Returns:
    {layer: LayerDissection}.
  """
  if len(data) == 0:
    raise ValueError(f'probe set {data.directory} has no images')
  categories = tuple(data.categories if categories is None else categories)
  layers, batch_size, image_size = settings.layers, settings.batch_size, settings.image_size
  forward = make_forward(model, layers=layers, mean=settings.mean, std=settings.std)
  probe_shape = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
  shapes = jax.eval_shape(forward, variables, probe_shape)
  map_sizes = {name: tuple(shapes[name].shape[1:3]) for name in layers}
  num_units = {name: shapes[name].shape[3] for name in layers}
  selectors = {name: quantile_lib.TopQuantile(
      num_units=num_units[name], num_values=len(data) * int(np.prod(map_sizes[name])),
      quantile=settings.quantile, exact=settings.exact_quantile) for name in layers}
  states = {name: selectors[name].init() for name in layers}
  keep = min(settings.top_images, len(data))
  top = {name: (jnp.full((num_units[name], keep), -jnp.inf),
                jnp.full((num_units[name], keep), -1, jnp.int32)) for name in layers}
  num_passes = selectors[layers[0]].num_passes + 1

  def read_batches(description, with_labels):
    progress = Progress(len(data), description=description) if show_progress else None
    seg_size = data.segmentation_size() if with_labels else None
    for batch in data.batches(batch_size=batch_size, image_size=image_size,
                              categories=categories if with_labels else (),
                              segmentation_size=seg_size):
      size = len(batch['index'])
      valid = np.arange(batch_size) < size
      images = _pad(batch['image'], batch_size)
      rows = _pad(batch['index'].astype(np.int32), batch_size)
      labels = (tuple(_pad(x, batch_size) for x in stacked_labels(
          batch, categories, segmentation_size=seg_size)) if with_labels else None)
      yield images, rows, valid, labels
      if progress:
        progress.update(size)
    if progress:
      progress.close()

  cache = settings.probe_cache
  if cache == 'auto':  # on the CPU decoding once does not pay for holding every label map
    fits = probe_set_bytes(data, batch_size=batch_size, image_size=image_size,
                           categories=categories) <= DEVICE_CACHE_BYTES
    cache = 'device' if fits and jax.default_backend() != 'cpu' else 'none'
  if cache == 'device':
    cached = [jax.device_put(batch) for batch in read_batches(
        f'dissect: loading the probe set onto {jax.devices()[0].platform}', with_labels=True)]

    def image_batches(description, with_labels):
      del description
      for images, rows, valid, labels in cached:
        yield images, rows, valid, labels if with_labels else None
  else:
    image_batches = read_batches

  bits_per_pass = selectors[layers[0]].bits_per_pass
  for pass_index in range(num_passes - 1):
    started = time.perf_counter()
    step = _threshold_step(bits_per_pass=bits_per_pass, pass_index=pass_index,
                           last_pass=pass_index + 2 == num_passes)
    description = f'dissect pass {pass_index + 1}/{num_passes} (thresholds)'
    for images, rows, valid, _ in image_batches(description, with_labels=False):
      activations = forward(variables, images)
      states = step(states, activations, valid)
      if pass_index == 0:
        top = _merge_top_images_of_layers(top, activations, rows, valid, k=keep)
    states = {name: selectors[name].advance(states[name], pass_index=pass_index)
              for name in layers}
    if timings is not None:
      timings[f'pass {pass_index + 1} (thresholds)'] = time.perf_counter() - started
  thresholds = {name: selectors[name].thresholds(states[name]) for name in layers}

  started = time.perf_counter()
  onehot = jnp.asarray(tally_lib.category_onehot(
      data.primary_category_index(categories), len(categories)))
  seg_h, seg_w = data.segmentation_size()
  step = _tally_step(images_per_step=tuple(
      (name, tally_lib.images_per_step(batch_size=batch_size, pixels=seg_h * seg_w,
                                       num_units=num_units[name], num_labels=data.num_labels))
      for name in layers), upsampling=settings.upsampling)
  totals = {name: tally_lib.TallyCounts.zeros(
      num_units=num_units[name], num_labels=data.num_labels, num_categories=len(categories))
      for name in layers}
  pending = None  # read a batch's counts back only after the next batch is dispatched
  description = f'dissect pass {num_passes}/{num_passes} (IoU tally)'
  for images, _, valid, (pixel, image) in image_batches(description, with_labels=True):
    dispatched = step(forward(variables, images), valid, thresholds, pixel, image, onehot)
    if pending is not None:
      totals = {name: totals[name] + tally_lib.TallyCounts(*jax.device_get(pending[name]))
                for name in layers}
    pending = dispatched
  totals = {name: totals[name] + tally_lib.TallyCounts(*jax.device_get(pending[name]))
            for name in layers}
  if timings is not None:
    timings[f'pass {num_passes} (tally)'] = time.perf_counter() - started

  return {name: LayerDissection(
      thresholds=thresholds[name],
      threshold_error_bound=selectors[name].approximation_bound(states[name]),
      counts=totals[name], top_indices=np.asarray(top[name][1]),
      top_values=np.asarray(top[name][0]), map_size=map_sizes[name]) for name in layers}


def top_image_maps(forward: Callable, variables, data: broden_lib.Broden, *, layer: str,
                   top_indices: np.ndarray, image_size: int, batch_size: int):
  """Re-runs the model on each unit's top images.

  Returns:
    images: uint8 [M, S, S, 3] the distinct top images, `rows` int [M] their probe rows;
    maps: float32 [C, k, h, w] unit c's map on its j-th top image.
  """
  rows = np.unique(top_indices[top_indices >= 0])
  position = {row: i for i, row in enumerate(rows)}
  images = np.stack([data.load_image(int(row), (image_size, image_size)) for row in rows])
  per_image = []
  for start in range(0, len(rows), batch_size):
    chunk = images[start:start + batch_size]
    per_image.append(np.asarray(forward(variables, _pad(chunk, batch_size))[layer])[:len(chunk)])
  per_image = np.concatenate(per_image)  # [M, h, w, C]
  num_units, k = top_indices.shape
  maps = np.zeros((num_units, k) + per_image.shape[1:3], np.float32)
  for unit in range(num_units):
    for j, row in enumerate(top_indices[unit]):
      if row >= 0:
        maps[unit, j] = per_image[position[row], :, :, unit]
  return images, rows, maps
