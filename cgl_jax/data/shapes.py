"""The synthetic shapes dataset of the CGL paper, with pixel-exact concept masks.

Each image is 64×64 RGB on a white background with two filled shapes, each
inside a 12×12 box: one in the top half and one in the bottom half, at a random
position inside its half. A shape is one of {square, circle, triangle} and has
one pure colour from {red, green, blue}; an *item* is such a (colour, shape)
pair, item id ``3·colour + shape`` (9 items).

Label settings (``SETTINGS``):

* ``classes45``: the class is the unordered pair of the two items,
  C(9, 2) + 9 = 45 classes, ids in ``itertools.combinations_with_replacement``
  order.
* ``binary``: 1 iff a square is present. It relabels *the same images* as
  ``classes45`` (as the paper describes one dataset with two labellings), so
  both settings probe the same concept distribution and one Broden export
  serves both. 24 of the 45 pairs contain a square, so each split holds
  exactly 24/45 ≈ 53.3 % positives (e.g. 12,288 of 23,040 training images).

Splits are stratified: every class has exactly ``images_per_class·train_fraction``
training images (512 by default) and the rest (128) in validation, shuffled.

Concepts are stored compactly as two uint8 label maps per image:
``color_map`` (0 = background, 1 + index into ``COLORS``) and ``shape_map``
(0 = background, 1 + index into ``SHAPES``); ``concept_label_maps`` and
``concept_masks`` expand them into the Broden label ids and the 15 boolean
masks (``CONCEPTS`` order). There is no antialiasing, so the masks are exact:
every non-white pixel lies in exactly one colour and one shape mask.

Determinism: random numbers are the raw 64-bit outputs of ``PCG64`` seeded by
``SeedSequence([seed, split index])``, mapped to ranges with integer
arithmetic, and shapes are rasterised with integer pixel-centre tests. Both
algorithms are fixed by numpy's documentation (unlike ``Generator`` methods,
whose streams may change between numpy versions), so a seed gives the same
bytes on every machine and numpy version.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence

import numpy as np

from cgl_jax.data import broden

IMAGE_SIZE = 64
SHAPE_SIZE = 12  # every shape lies inside a SHAPE_SIZE × SHAPE_SIZE box
COLORS = ('red', 'green', 'blue')
SHAPES = ('square', 'circle', 'triangle')
# Row 0 is the background; row 1 + c is COLORS[c].
PALETTE = np.array([(255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)],
                   dtype=np.uint8)
SETTINGS = ('binary', 'classes45')
SPLITS = ('train', 'validation')
CATEGORIES = ('color', 'shape', 'color_shape')

ITEMS = tuple(f'{c}_{s}' for c in COLORS for s in SHAPES)  # item id 3·c + s
_PAIRS = tuple(itertools.combinations_with_replacement(range(len(ITEMS)), 2))
# _PAIR_CLASS[a, b] = classes45 id of the unordered item pair {a, b}.
_PAIR_CLASS = np.zeros((len(ITEMS), len(ITEMS)), np.int32)
for _k, (_a, _b) in enumerate(_PAIRS):
  _PAIR_CLASS[_a, _b] = _PAIR_CLASS[_b, _a] = _k
del _k, _a, _b

# Broden concepts: (name, category); label id = 1 + position (0 = no label).
CONCEPTS = (tuple((c, 'color') for c in COLORS)
            + tuple((s, 'shape') for s in SHAPES)
            + tuple((i, 'color_shape') for i in ITEMS))
_FIRST_LABEL_ID = {'color': 1, 'shape': 1 + len(COLORS),
                   'color_shape': 1 + len(COLORS) + len(SHAPES)}


def _stamps() -> np.ndarray:
  """bool [3, 12, 12]: the pixels of each shape in its box, in SHAPES order.

  Pixel (r, c) has centre (r + ½, c + ½); with d = 12 and doubled coordinates
  u = 2c + 1 − d, v = 2r + 1 − d (odd integers in [−11, 11]) the tests are
  exact integer arithmetic:
    square:   every pixel of the box;
    circle:   centre (6, 6), radius 6:             u² + v² ≤ d²;
    triangle: apex at the top centre, base on the bottom edge (height d,
              base d): |x − 6| ≤ y/2, tested at the centre of each pixel's
              lower edge (r + 1, c + ½) so the apex row is drawn too:
              |u| ≤ r + 1.
  """
  d = SHAPE_SIZE
  r, c = np.meshgrid(np.arange(d), np.arange(d), indexing='ij')
  u, v = 2 * c + 1 - d, 2 * r + 1 - d
  square = np.ones((d, d), bool)
  circle = u * u + v * v <= d * d
  triangle = np.abs(u) <= r + 1
  return np.stack([square, circle, triangle])


STAMPS = _stamps()


# ----------------------------------------------------------------------------
# Names and sizes.


def class_names(setting: str) -> tuple[str, ...]:
  """Class names of a label setting, indexed by label id.

  ``binary``: ('no_square', 'square'); ``classes45``: 'red_square+blue_circle'
  style names of the unordered item pairs (the smaller item id first).
  """
  _check_choice('setting', setting, SETTINGS)
  if setting == 'binary':
    return ('no_square', 'square')
  return tuple(f'{ITEMS[a]}+{ITEMS[b]}' for a, b in _PAIRS)


def num_classes(setting: str) -> int:
  return len(class_names(setting))


def split_sizes(*, images_per_class: int = 640,
                train_fraction: float = 0.8) -> dict[str, int]:
  """Images per classes45 class in each split: {'train': n, 'validation': m}.

  n = round(images_per_class · train_fraction), m = images_per_class − n; both
  must be positive so that every class appears in every split.
  """
  if (not isinstance(images_per_class, (int, np.integer))
      or isinstance(images_per_class, bool) or images_per_class < 2):
    raise ValueError('images_per_class must be an integer >= 2 (one image per '
                     f'class in each split); got {images_per_class!r}.')
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f'train_fraction must lie in (0, 1); got {train_fraction!r}.')
  train = int(round(images_per_class * train_fraction))
  sizes = {'train': train, 'validation': images_per_class - train}
  if min(sizes.values()) == 0:
    raise ValueError(
        f'images_per_class={images_per_class} with train_fraction='
        f'{train_fraction} leaves a split empty ({sizes}); use more images.')
  return sizes


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f'{name} must be one of {tuple(choices)}; got {value!r}.')


# ----------------------------------------------------------------------------
# Sampling: what goes where.


@dataclasses.dataclass(frozen=True)
class Layout:
  """What to draw in N images (small; `render` turns it into pixels).

  Attributes:
    items: int32 [N, 2], item ids (3·colour + shape); slot 0 is the top half,
      slot 1 the bottom half.
    corners: int32 [N, 2, 2], (row, column) of the top-left pixel of each
      slot's SHAPE_SIZE box; slot 0 rows lie in [0, 32 − 12], slot 1 rows in
      [32, 64 − 12], columns in [0, 64 − 12].
  """
  items: np.ndarray
  corners: np.ndarray

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index) -> Layout:
    return Layout(self.items[index], self.corners[index])

  @property
  def pair_classes(self) -> np.ndarray:
    """int32 [N]: the classes45 label of each image."""
    return _PAIR_CLASS[self.items[:, 0], self.items[:, 1]]


def _uniform_ints(bits: np.random.PCG64, high: int, size) -> np.ndarray:
  """int64 uniform on [0, high) from raw 64-bit draws (bias < high / 2⁶⁴)."""
  raw = bits.random_raw(int(np.prod(size)))
  return (raw % np.uint64(high)).astype(np.int64).reshape(size)


def sample_layout(split: str, *, seed: int = 0, images_per_class: int = 640,
                  train_fraction: float = 0.8) -> Layout:
  """Samples the stratified, shuffled layout of one split.

  Each of the 45 unordered pairs gets `split_sizes(...)[split]` images; per
  image a fair coin puts one of the two items on top, and each box position is
  uniform over the positions that keep it inside its half. The two splits use
  independent streams (seed sequence [seed, split index]).
  """
  _check_choice('split', split, SPLITS)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer; got {seed!r}.')
  per_class = split_sizes(images_per_class=images_per_class,
                          train_fraction=train_fraction)[split]
  bits = np.random.PCG64(np.random.SeedSequence([int(seed), SPLITS.index(split)]))
  classes = np.repeat(np.arange(len(_PAIRS)), per_class)
  classes = classes[np.argsort(bits.random_raw(len(classes)), kind='stable')]
  n = len(classes)

  pairs = np.asarray(_PAIRS, np.int32)[classes]  # [N, 2], sorted item ids
  swap = _uniform_ints(bits, 2, (n,)).astype(bool)
  items = np.where(swap[:, None], pairs[:, ::-1], pairs)

  half = IMAGE_SIZE // 2
  rows = _uniform_ints(bits, half - SHAPE_SIZE + 1, (n, 2))
  rows[:, 1] += half
  cols = _uniform_ints(bits, IMAGE_SIZE - SHAPE_SIZE + 1, (n, 2))
  corners = np.stack([rows, cols], axis=-1).astype(np.int32)
  return Layout(items=items.astype(np.int32), corners=corners)


# ----------------------------------------------------------------------------
# Rendering.


def render(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
  """Rasterises a layout into its concept label maps.

  Returns:
    (color_map, shape_map), uint8 [N, 64, 64]: 0 on the background, else
    1 + the index into COLORS / SHAPES of the shape covering the pixel.
  """
  n = len(layout)
  color_map = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  shape_map = np.zeros_like(color_map)
  offsets = np.arange(SHAPE_SIZE)
  for slot in range(layout.items.shape[1]):
    color, shape = np.divmod(layout.items[:, slot], len(SHAPES))
    rows = layout.corners[:, slot, 0, None, None] + offsets[None, :, None]
    cols = layout.corners[:, slot, 1, None, None] + offsets[None, None, :]
    image = np.arange(n)[:, None, None]
    # Flat pixel index of every box pixel, [N, 12, 12]; keep the shape's own.
    flat = (image * IMAGE_SIZE + rows) * IMAGE_SIZE + cols
    inside = STAMPS[shape]
    owner = np.broadcast_to(image, inside.shape)[inside]
    color_map.reshape(-1)[flat[inside]] = (color + 1).astype(np.uint8)[owner]
    shape_map.reshape(-1)[flat[inside]] = (shape + 1).astype(np.uint8)[owner]
  return color_map, shape_map


def to_rgb(color_map: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W] colour map → uint8 [..., H, W, 3] image (white background)."""
  return PALETTE[color_map]


def labels(layout: Layout, setting: str) -> np.ndarray:
  """int32 [N] labels of a layout in a setting (see the module docstring)."""
  _check_choice('setting', setting, SETTINGS)
  if setting == 'classes45':
    return layout.pair_classes
  is_square = layout.items % len(SHAPES) == SHAPES.index('square')
  return is_square.any(axis=1).astype(np.int32)


# ----------------------------------------------------------------------------
# Concept masks.


def concept_label_maps(color_map: np.ndarray,
                       shape_map: np.ndarray) -> dict[str, np.ndarray]:
  """Per category, int32 [..., H, W] Broden label ids (1 + index into CONCEPTS).

  With c = color_map − 1 and s = shape_map − 1 on shape pixels:
    color → 1 + c,  shape → 4 + s,  color_shape → 7 + 3c + s;  0 on background.
  """
  if color_map.shape != shape_map.shape:
    raise ValueError(f'color_map {color_map.shape} and shape_map '
                     f'{shape_map.shape} must have the same shape.')
  color = color_map.astype(np.int32)
  shape = shape_map.astype(np.int32)
  on_shape = color > 0
  if np.any(on_shape != (shape > 0)):
    raise ValueError('color_map and shape_map disagree on which pixels are '
                     'background.')
  ids = {
      'color': color - 1 + _FIRST_LABEL_ID['color'],
      'shape': shape - 1 + _FIRST_LABEL_ID['shape'],
      'color_shape': (color - 1) * len(SHAPES) + shape - 1
                     + _FIRST_LABEL_ID['color_shape'],
  }
  return {category: np.where(on_shape, label_id, 0)
          for category, label_id in ids.items()}


def concept_masks(color_map: np.ndarray, shape_map: np.ndarray) -> np.ndarray:
  """bool [..., H, W, 15]: the pixel mask of every concept, in CONCEPTS order."""
  label_maps = concept_label_maps(color_map, shape_map)
  return np.stack([label_maps[category] == label_id
                   for label_id, (_, category) in enumerate(CONCEPTS, start=1)],
                  axis=-1)


# ----------------------------------------------------------------------------
# Whole splits.


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split of the dataset, as numpy arrays.

  Attributes:
    images: uint8 [N, 64, 64, 3].
    labels: int32 [N], in the requested setting.
    color_map: uint8 [N, 64, 64], 0 = background, 1 + index into COLORS.
    shape_map: uint8 [N, 64, 64], 0 = background, 1 + index into SHAPES.
    layout: the `Layout` the images were drawn from.
  """
  images: np.ndarray
  labels: np.ndarray
  color_map: np.ndarray
  shape_map: np.ndarray
  layout: Layout

  def __len__(self) -> int:
    return len(self.labels)


def draw(layout: Layout, setting: str) -> Examples:
  """Renders a layout (or a slice of one) into `Examples`."""
  color_map, shape_map = render(layout)
  return Examples(images=to_rgb(color_map), labels=labels(layout, setting),
                  color_map=color_map, shape_map=shape_map, layout=layout)


def generate(split: str, *, setting: str = 'binary', seed: int = 0,
             images_per_class: int = 640, train_fraction: float = 0.8) -> Examples:
  """Generates one split: `sample_layout` then `draw` (see their docs)."""
  _check_choice('setting', setting, SETTINGS)
  layout = sample_layout(split, seed=seed, images_per_class=images_per_class,
                         train_fraction=train_fraction)
  return draw(layout, setting)


PROBE_SPLITS = SPLITS + ('all',)


def export_broden(directory: str, *, split: str = 'validation', seed: int = 0,
                  images_per_class: int = 640, train_fraction: float = 0.8,
                  image_format: str = 'png', overwrite: bool = False) -> str:
  """Writes a split as a Broden-format probe set (`broden.write_broden`).

  Categories ``color``, ``shape`` and ``color_shape`` with the 15 `CONCEPTS`
  (label ids 1..15 in that order) as pixel labels. Both label settings share
  the images, so the export has no `setting`; pass the generator arguments of
  the trained dataset (e.g. a tfds config's ``generator_kwargs()``) to probe
  the images it was validated on.

  Args:
    split: 'validation', 'train', or 'all' (train then validation: the CGL
      authors probe all 28,800 images). index.csv's ``split`` column says
      which split each image came from ('train' / 'val').
    image_format: 'png' (lossless) or 'jpeg' (quality 95, as the authors
      stored their synthetic images); the label PNGs are always lossless.

  Returns:
    `directory`.
  """
  _check_choice('split', split, PROBE_SPLITS)
  parts = SPLITS if split == 'all' else (split,)
  examples = [generate(part, seed=seed, images_per_class=images_per_class,
                       train_fraction=train_fraction) for part in parts]
  color_map = np.concatenate([e.color_map for e in examples])
  shape_map = np.concatenate([e.shape_map for e in examples])
  splits = [('val' if part == 'validation' else part)
            for part, e in zip(parts, examples) for _ in range(len(e))]
  return broden.write_broden(
      directory, images=np.concatenate([e.images for e in examples]), concepts=CONCEPTS,
      pixel_labels=concept_label_maps(color_map, shape_map), splits=splits,
      image_format=image_format, overwrite=overwrite)
