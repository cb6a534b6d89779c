"""The Broden segmentation format: one reader and one writer (numpy + PIL only).

Broden (Bau et al., CVPR 2017) is the probe set of Network Dissection. A Broden directory holds

  index.csv       one row per image: ``image,split,ih,iw,sh,sw,<category>...``; ``image`` is a path
                  relative to ``images/``; ``ih, iw`` the image size, ``sh, sw`` the segmentation
                  size; each category column holds ';'-separated entries, either segmentation PNG
                  paths (relative to ``images/``; several per category, e.g. part layers) or
                  decimal label ids of image-level labels (covering the whole image); '' = none.
  category.csv    ``name,first,last,count,frequency``: categories in order.
  label.csv       ``number,name,category,frequency,coverage,syns``; ``category`` is
                  ``cat(count);cat(count)``, label ids are global over all categories.
  c_<cat>.csv     ``code,number,name,frequency,coverage``: the labels of one category with a
                  dense per-category ``code``; its ``coverage`` picks a label's primary category.
  images/         images (jpg in the real Broden; our synthetic exports write lossless png by
                  default, or jpg) and segmentation PNGs whose label id per pixel is
                  ``R + 256 * G``.

`write_broden` writes this format atomically; `Broden` reads it (ours and the real one) and serves
batches of resized images with their label maps at the segmentation resolution.
"""
from __future__ import annotations

import concurrent.futures
import copy
import csv
import dataclasses
import os
import re
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from cgl_jax import fileio

INDEX_META_COLUMNS = ('image', 'split', 'ih', 'iw', 'sh', 'sw')
CATEGORY_COLUMNS = ('name', 'first', 'last', 'count', 'frequency')
LABEL_COLUMNS = ('number', 'name', 'category', 'frequency', 'coverage', 'syns')
CATEGORY_LABEL_COLUMNS = ('code', 'number', 'name', 'frequency', 'coverage')
_NAME_PATTERN = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.+-]*$')
_LABEL_CATEGORY_PATTERN = re.compile(r'^([^(]+)\((\d+)\)$')
IMAGE_FORMATS = ('png', 'jpeg')
JPEG_QUALITY = 95  # OpenCV's default, with which the CGL authors wrote their synthetic images


# ----------------------------------------------------------------------------------------------
# Label PNGs.


def encode_label_png(label_ids: np.ndarray) -> np.ndarray:
  """Label ids int [H, W] (0 ≤ id < 65536) → uint8 RGB [H, W, 3] with id = R + 256·G, B = 0."""
  label_ids = np.asarray(label_ids)
  if label_ids.size and (label_ids.min() < 0 or label_ids.max() >= 1 << 16):
    raise ValueError(f'label ids must lie in [0, 65535]; got range '
                     f'[{label_ids.min()}, {label_ids.max()}]')
  rgb = np.zeros(label_ids.shape + (3,), np.uint8)
  rgb[..., 0] = label_ids % 256
  rgb[..., 1] = label_ids // 256
  return rgb


def decode_label_png(path: str) -> np.ndarray:
  """Reads a Broden segmentation PNG → int32 [H, W] label ids (R + 256·G)."""
  with Image.open(path) as png:
    if png.mode in ('L', 'I', 'I;16'):  # single-channel: the value is the id itself
      return np.asarray(png, dtype=np.int32)
    rgb = np.asarray(png.convert('RGB'), dtype=np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1]


# ----------------------------------------------------------------------------------------------
# Writer.


def _check_name(kind: str, name: str) -> None:
  if not isinstance(name, str) or not _NAME_PATTERN.match(name):
    raise ValueError(f'{kind} name {name!r} must match {_NAME_PATTERN.pattern} '
                     '(it becomes part of file names and CSV columns)')


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)


def _validate_write_inputs(images, concepts, pixel_labels, image_labels):
  """Checks shapes, names and label ids; returns (images, categories, label_category)."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be uint8 [N, H, W, 3]; got {images.dtype} {images.shape}')
  num_images = images.shape[0]
  categories: list[str] = []
  label_category = ['']  # label id → category; id 0 is "no label"
  seen_names = set()
  for position, concept in enumerate(concepts):
    if len(concept) != 2:
      raise ValueError(f'concepts[{position}] must be (name, category); got {concept!r}')
    name, category = concept
    _check_name('concept', name)
    _check_name('category', category)
    if name in seen_names:
      raise ValueError(f'concepts[{position}]: duplicate concept name {name!r}')
    seen_names.add(name)
    if category not in categories:
      categories.append(category)
    label_category.append(category)
  num_labels = len(label_category)

  for category, maps in pixel_labels.items():
    if category not in categories:
      raise ValueError(f'pixel_labels has category {category!r}, which no concept has; '
                       f'concept categories: {categories}')
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != num_images or not np.issubdtype(maps.dtype, np.integer):
      raise ValueError(f'pixel_labels[{category!r}] must be int [N={num_images}, H, W]; '
                       f'got {maps.dtype} {maps.shape}')
    present = np.unique(maps)
    wrong = [int(i) for i in present
             if i != 0 and not (0 < i < num_labels and label_category[i] == category)]
    if wrong:
      raise ValueError(f'pixel_labels[{category!r}] holds label ids {wrong[:10]} that are not '
                       f'concepts of category {category!r} (valid: 0 and ids 1..{num_labels - 1} '
                       'of that category)')
  seg_shapes = {np.shape(m)[1:] for m in pixel_labels.values()}
  if len(seg_shapes) > 1:
    raise ValueError(f'all pixel_labels must share one segmentation size; got {seg_shapes}')

  for category, per_image in (image_labels or {}).items():
    if category not in categories:
      raise ValueError(f'image_labels has category {category!r}, which no concept has; '
                       f'concept categories: {categories}')
    if len(per_image) != num_images:
      raise ValueError(f'image_labels[{category!r}] must have one list per image '
                       f'(N={num_images}); got {len(per_image)}')
    for i, ids in enumerate(per_image):
      for label in ids:
        if not (0 < int(label) < num_labels and label_category[int(label)] == category):
          raise ValueError(f'image_labels[{category!r}][{i}] holds label id {label}, not a '
                           f'concept of category {category!r}')
  return images, categories, label_category


def write_broden(directory: str, *, images: np.ndarray,
                 concepts: Sequence[tuple[str, str]],
                 pixel_labels: Mapping[str, np.ndarray],
                 image_labels: Mapping[str, Sequence[Sequence[int]]] | None = None,
                 splits: Sequence[str] | None = None, image_format: str = 'png',
                 overwrite: bool = False) -> str:
  """Writes a Broden-format probe set; returns `directory`.

  Args:
    directory: where to write; created atomically (written into a sibling temp dir, then renamed),
      so readers never see a half-written data set.
    images: uint8 [N, H, W, 3], stored as `image_format`.
    concepts: (name, category) pairs; concept i (0-based) gets the global label id i + 1
      (0 = no label). Categories are ordered by first appearance.
    pixel_labels: {category: int [N, sh, sw]} label ids of that category (0 = none). Images whose
      map is all zero get an empty field, as in the real Broden.
    image_labels: {category: N lists of label ids} for image-level labels (cover the whole image).
    splits: the ``split`` column of each image (default: all ``val``, a probe set).
    image_format: 'png' (lossless, the default) or 'jpeg' (``.jpg``, PIL quality `JPEG_QUALITY`
      with its default 4:2:0 chroma subsampling, as the real Broden and the CGL authors'
      synthetic probe set store images).
    overwrite: replace an existing `directory`; otherwise an existing one is an error.

  Statistics written as Broden defines them: a label's ``frequency`` is the number of images it
  appears in; its ``coverage`` the sum over images of the fraction of pixels it covers (1 for an
  image-level label); a category's ``frequency`` the number of images with any of its labels.
  """
  image_labels = dict(image_labels or {})
  images, categories, label_category = _validate_write_inputs(
      images, concepts, pixel_labels, image_labels)
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f'image_format must be one of {IMAGE_FORMATS}; got {image_format!r}')
  splits = ['val'] * len(images) if splits is None else list(splits)
  if len(splits) != len(images) or not all(isinstance(x, str) and x for x in splits):
    raise ValueError(f'splits must name a split (non-empty str) for each of the {len(images)} '
                     f'images; got {len(splits)} entries')
  directory = os.path.abspath(directory)
  num_images, height, width, _ = images.shape
  seg_h, seg_w = (np.shape(next(iter(pixel_labels.values())))[1:]
                  if pixel_labels else (height, width))
  num_labels = len(label_category)
  label_frequency = np.zeros(num_labels, np.int64)
  label_coverage = np.zeros(num_labels, np.float64)
  category_frequency = {c: 0 for c in categories}

  with fileio.atomic_directory(directory, overwrite=overwrite) as staging:
    os.makedirs(os.path.join(staging, 'images'))
    index_rows = []
    for i in range(num_images):
      stem = f'{i:06d}'
      image_name = _save_image(os.path.join(staging, 'images', stem), images[i], image_format)
      row = [image_name, splits[i], height, width, seg_h, seg_w]
      for category in categories:
        entries = []
        if category in pixel_labels:
          label_map = np.asarray(pixel_labels[category][i])
          ids, counts = np.unique(label_map, return_counts=True)
          if ids.max() > 0:
            png_name = f'{stem}_{category}.png'
            Image.fromarray(encode_label_png(label_map)).save(
                os.path.join(staging, 'images', png_name))
            entries.append(png_name)
            keep = ids > 0
            label_frequency[ids[keep]] += 1
            label_coverage[ids[keep]] += counts[keep] / label_map.size
        if category in image_labels:
          ids = sorted({int(label) for label in image_labels[category][i]})
          entries.extend(str(label) for label in ids)
          label_frequency[ids] += 1
          label_coverage[ids] += 1.0
        category_frequency[category] += bool(entries)
        row.append(';'.join(entries))
      index_rows.append(row)
    _write_csv(os.path.join(staging, 'index.csv'), INDEX_META_COLUMNS + tuple(categories),
               index_rows)

    ids_of = {c: [i for i in range(1, num_labels) if label_category[i] == c] for c in categories}
    _write_csv(os.path.join(staging, 'category.csv'), CATEGORY_COLUMNS,
               [[c, min(ids_of[c]), max(ids_of[c]), len(ids_of[c]), category_frequency[c]]
                for c in categories])
    names = [''] + [name for name, _ in concepts]
    _write_csv(os.path.join(staging, 'label.csv'), LABEL_COLUMNS,
               [[i, names[i], f'{label_category[i]}({label_frequency[i]})', label_frequency[i],
                 f'{label_coverage[i]:.6f}', ''] for i in range(1, num_labels)])
    for c in categories:
      _write_csv(os.path.join(staging, f'c_{c}.csv'), CATEGORY_LABEL_COLUMNS,
                 [[code, i, names[i], label_frequency[i], f'{label_coverage[i]:.6f}']
                  for code, i in enumerate(ids_of[c], start=1)])
  return directory


def _save_image(stem: str, image: np.ndarray, image_format: str) -> str:
  """Writes `image` to `stem`.png or `stem`.jpg; returns the file's name."""
  if image_format == 'jpeg':
    Image.fromarray(image).save(stem + '.jpg', quality=JPEG_QUALITY)
    return os.path.basename(stem) + '.jpg'
  Image.fromarray(image).save(stem + '.png')
  return os.path.basename(stem) + '.png'


# ----------------------------------------------------------------------------------------------
# Reader.


class BrodenFormatError(ValueError):
  """A Broden CSV file does not have the expected content (the message names file and line)."""


@dataclasses.dataclass(frozen=True)
class Label:
  """One concept. `category` is its primary category (max coverage, as the reference decides)."""
  id: int
  name: str
  category: str
  frequency: int  # images the label appears in
  coverage: float  # summed pixel fraction over images
  categories: Mapping[str, int]  # category → number of images in that category


@dataclasses.dataclass(frozen=True)
class IndexRow:
  """One parsed index.csv row; paths are relative to ``images/``."""
  image: str
  split: str
  ih: int
  iw: int
  sh: int
  sw: int
  segmentations: Mapping[str, tuple[str, ...]]  # category → PNG paths (label layers)
  image_labels: Mapping[str, tuple[int, ...]]  # category → image-level label ids


def _read_csv(path: str, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
  """Reads a CSV with a header → [(line number, {column: value})], checking the columns."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Broden file missing: {path}')
  with open(path, newline='') as f:
    reader = csv.reader(f)
    try:
      header = next(reader)
    except StopIteration:
      raise BrodenFormatError(f'{path}: empty file, expected a header with columns '
                              f'{",".join(required)}') from None
    missing = [c for c in required if c not in header]
    if missing:
      raise BrodenFormatError(f'{path}, line 1: header lacks columns {missing}; expected at '
                              f'least {",".join(required)}, got {",".join(header)}')
    rows = []
    for values in reader:
      if not values:
        continue
      if len(values) != len(header):
        raise BrodenFormatError(
            f'{path}, line {reader.line_num}: expected {len(header)} fields '
            f'({",".join(header)}), got {len(values)}: {",".join(values)!r}')
      rows.append((reader.line_num, dict(zip(header, values))))
  return rows


def _parse_int(path: str, line: int, column: str, value: str, *, minimum: int = 0) -> int:
  if not re.fullmatch(r'\d+', value.strip()) or int(value) < minimum:
    raise BrodenFormatError(f'{path}, line {line}: column {column!r} must be an integer '
                            f'≥ {minimum}, got {value!r}')
  return int(value)


def _parse_float(path: str, line: int, column: str, value: str) -> float:
  try:
    return float(value) if value.strip() else 0.0
  except ValueError:
    raise BrodenFormatError(f'{path}, line {line}: column {column!r} must be a number, '
                            f'got {value!r}') from None


class Broden:
  """Reader of a Broden-format directory (the real Broden and our synthetic exports).

  Categories are those of category.csv, or the subset `categories` of them (NetDissect-Lite's
  default leaves out ``material``). index.csv columns of other categories are ignored, so a
  trimmed category.csv works as in the reference. With `categories` given, images with no
  label in any of them are left out, as the reference's SegmentationData does.

  Attributes:
    directory: the data set root.
    categories: the categories used, in category.csv order.
    labels: `Label`s indexed by id; ``labels[0]`` is the "no label" placeholder, named '' as the
      reference names it (its label.csv has no row 0).
    rows: parsed index.csv rows (`IndexRow`), optionally filtered by split.
  """

  def __init__(self, directory: str, *, split: str | None = None,
               categories: Sequence[str] | None = None):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(self.directory):
      raise FileNotFoundError(f'Broden directory missing: {self.directory}')
    path = lambda name: os.path.join(self.directory, name)

    category_rows = _read_csv(path('category.csv'), ('name',))
    listed = tuple(row['name'] for _, row in category_rows)
    if categories is not None:
      if isinstance(categories, str) or not categories:
        raise ValueError(f'categories must be a non-empty sequence of category names (None: '
                         f'all of {listed}); got {categories!r}')
      unknown = [c for c in categories if c not in listed]
      if unknown:
        raise ValueError(f'categories {unknown} are not in {path("category.csv")} '
                         f'({", ".join(listed)})')
    self.categories = tuple(c for c in listed if categories is None or c in categories)

    label_path = path('label.csv')
    names, counts, frequency, coverage = {}, {}, {}, {}
    for line, row in _read_csv(label_path, ('number', 'name', 'category')):
      number = _parse_int(label_path, line, 'number', row['number'], minimum=1)
      names[number] = row['name']
      counts[number] = {}
      for entry in filter(None, row['category'].split(';')):
        match = _LABEL_CATEGORY_PATTERN.match(entry)
        if not match:
          raise BrodenFormatError(f'{label_path}, line {line}: column \'category\' entries must '
                                  f'look like name(count), got {entry!r}')
        counts[number][match.group(1)] = int(match.group(2))
      frequency[number] = _parse_int(label_path, line, 'frequency', row.get('frequency') or '0')
      coverage[number] = _parse_float(label_path, line, 'coverage', row.get('coverage') or '')

    # Per label, (coverage, category index) for each c_<cat>.csv listing it: the reference's
    # primary category is the one of largest coverage (ties: the later category).
    self._category_coverage: dict[int, list[tuple[float, int]]] = {}
    for index, category in enumerate(self.categories):
      c_path = path(f'c_{category}.csv')
      for line, row in _read_csv(c_path, ('code', 'number')):
        number = _parse_int(c_path, line, 'number', row['number'], minimum=1)
        cov = _parse_float(c_path, line, 'coverage', row.get('coverage') or '')
        self._category_coverage.setdefault(number, []).append((cov, index))
    num_labels = max(names, default=0) + 1
    labels = [Label(0, '', '', 0, 0.0, {})]
    for number in range(1, num_labels):
      listed = self._category_coverage.get(number)
      labels.append(Label(number, names.get(number, ''),
                          self.categories[max(listed)[1]] if listed else '',
                          frequency.get(number, 0), coverage.get(number, 0.0),
                          counts.get(number, {})))
    self.labels: tuple[Label, ...] = tuple(labels)

    index_path = path('index.csv')
    index_rows = _read_csv(index_path, INDEX_META_COLUMNS)
    rows = tuple(self._parse_index_row(index_path, line, row) for line, row in index_rows
                 if split is None or row['split'] == split)
    if categories is not None:
      rows = tuple(row for row in rows if row.segmentations or row.image_labels)
    self.rows: tuple[IndexRow, ...] = rows

  def _parse_index_row(self, path: str, line: int, row: Mapping[str, str]) -> IndexRow:
    sizes = {k: _parse_int(path, line, k, row[k], minimum=1) for k in ('ih', 'iw', 'sh', 'sw')}
    if not row['image']:
      raise BrodenFormatError(f'{path}, line {line}: column \'image\' is empty')
    segmentations, image_labels = {}, {}
    for category in self.categories:
      entries = [e for e in row.get(category, '').split(';') if e]
      ids = []
      for entry in entries:
        if re.fullmatch(r'\d+', entry):
          if not 0 < int(entry) < len(self.labels):
            raise BrodenFormatError(
                f'{path}, line {line}: column {category!r} has label id {entry}, expected an id '
                f'in 1..{len(self.labels) - 1} (label.csv) or a segmentation path')
          ids.append(int(entry))
      pngs = tuple(e for e in entries if not re.fullmatch(r'\d+', e))
      # A numeric entry next to PNG layers would be a constant layer in the reference; for the
      # tally a constant layer and an image-level label count the same, so both become the latter.
      if pngs:
        segmentations[category] = pngs
      if ids:
        image_labels[category] = tuple(ids)
    return IndexRow(row['image'], row['split'], segmentations=segmentations,
                    image_labels=image_labels, **sizes)

  # ------------------------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self.rows)

  def head(self, count: int) -> 'Broden':
    """A view of the first `count` images (same labels and files), e.g. for quick probes."""
    view = copy.copy(self)
    view.rows = self.rows[:count]
    return view

  @property
  def num_labels(self) -> int:
    """Number of label ids including 0 (= max id + 1)."""
    return len(self.labels)

  def label_names(self) -> tuple[str, ...]:
    return tuple(label.name for label in self.labels)

  def primary_category_index(self, categories: Sequence[str] | None = None) -> np.ndarray:
    """int32 [num_labels]: each label's primary category as an index into `categories`.

    The primary category is the one (among `categories`, default all) whose c_<cat>.csv gives
    the label the largest coverage, as the reference decides; -1 for id 0 and for labels in none
    of `categories`.
    """
    categories = tuple(self.categories if categories is None else categories)
    position = {self.categories.index(c): i for i, c in enumerate(categories)}
    result = np.full(self.num_labels, -1, np.int32)
    for number, listed in self._category_coverage.items():
      chosen = [(cov, index) for cov, index in listed if index in position]
      if chosen and number < self.num_labels:
        result[number] = position[max(chosen)[1]]
    return result

  def max_layers(self) -> dict[str, int]:
    """Per category, the most segmentation PNG layers any image has."""
    return {c: max((len(r.segmentations.get(c, ())) for r in self.rows), default=0)
            for c in self.categories}

  def max_image_labels(self) -> dict[str, int]:
    """Per category, the most image-level labels any image has."""
    return {c: max((len(r.image_labels.get(c, ())) for r in self.rows), default=0)
            for c in self.categories}

  def segmentation_size(self) -> tuple[int, int]:
    """The (sh, sw) shared by all rows; an error naming two rows that differ otherwise."""
    sizes = {}
    for i, row in enumerate(self.rows):
      sizes.setdefault((row.sh, row.sw), i)
    if len(sizes) != 1:
      examples = ', '.join(f'{self.rows[i].image}: {s}' for s, i in list(sizes.items())[:2])
      raise ValueError(f'{self.directory}: images have different segmentation sizes ({examples}); '
                       'pass segmentation_size= to resample them to one size')
    return next(iter(sizes))

  def image_path(self, i: int) -> str:
    return os.path.join(self.directory, 'images', self.rows[i].image)

  def load_image(self, i: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] image `i`, bilinearly resized to `image_size` (h, w) when given."""
    path = self.image_path(i)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Broden image missing: {path} (index.csv row {i})')
    with Image.open(path) as image:
      image = image.convert('RGB')
      if image_size is not None and image.size != (image_size[1], image_size[0]):
        image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
      return np.asarray(image, dtype=np.uint8)

  def load_segmentation(self, i: int, category: str, *, num_layers: int,
                        size: tuple[int, int] | None = None) -> np.ndarray:
    """int32 [num_layers, sh, sw] label ids of image `i` in `category` (missing layers are 0).

    Layers are resampled (nearest neighbour) to `size` when it differs from the row's.
    """
    row = self.rows[i]
    size = size or (row.sh, row.sw)
    out = np.zeros((num_layers,) + tuple(size), np.int32)
    for layer, relative in enumerate(row.segmentations.get(category, ())[:num_layers]):
      path = os.path.join(self.directory, 'images', relative)
      if not os.path.isfile(path):
        raise FileNotFoundError(f'Broden segmentation missing: {path} '
                                f'(index.csv row for {row.image}, category {category!r})')
      out[layer] = _nearest_resize(decode_label_png(path), size)
    return out

  def batches(self, *, batch_size: int, image_size: int | tuple[int, int] | None = None,
              segmentation_size: tuple[int, int] | None = None,
              categories: Sequence[str] | None = None, start: int = 0, stop: int | None = None,
              num_threads: int = 4) -> Iterator[dict]:
    """Yields batches of rows [start, stop) in order; the last one may be smaller.

    Each batch is a dict:
      ``index``: int64 [b] row numbers;
      ``image``: uint8 [b, h, w, 3] (resized to `image_size` if given, else all rows must share
        one size);
      ``pixel_labels``: {category: int32 [b, layers, sh, sw]} label ids, one layer per PNG
        (``layers`` = the most any image has; absent layers are 0);
      ``image_labels``: {category: int32 [b, k]} image-level label ids padded with 0.
    Files are decoded by `num_threads` threads, one batch ahead of the consumer.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be ≥ 1, got {batch_size}')
    if isinstance(image_size, int):
      image_size = (image_size, image_size)
    categories = tuple(self.categories if categories is None else categories)
    unknown = [c for c in categories if c not in self.categories]
    if unknown:
      raise ValueError(f'categories {unknown} not in {self.directory} ({self.categories})')
    seg_size = tuple(segmentation_size or self.segmentation_size())
    layers, num_image_labels = self.max_layers(), self.max_image_labels()
    stop = len(self) if stop is None else min(stop, len(self))

    def load(i):
      return (self.load_image(i, image_size),
              {c: self.load_segmentation(i, c, num_layers=layers[c], size=seg_size)
               for c in categories if layers[c]})

    def assemble(indices, examples):
      image_labels = {}
      for c in categories:
        if num_image_labels[c]:
          padded = np.zeros((len(indices), num_image_labels[c]), np.int32)
          for j, i in enumerate(indices):
            ids = self.rows[i].image_labels.get(c, ())
            padded[j, :len(ids)] = ids
          image_labels[c] = padded
      images = [image for image, _ in examples]
      if len({im.shape for im in images}) > 1:
        raise ValueError(f'{self.directory}: images of rows {indices[0]}..{indices[-1]} differ '
                         'in size; pass image_size= to resize them')
      return {'index': np.asarray(indices, np.int64),
              'image': np.stack(images),
              'pixel_labels': {c: np.stack([seg[c] for _, seg in examples])
                               for c in categories if layers[c]},
              'image_labels': image_labels}

    chunks = [list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size)]
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
      pending = None
      for indices in chunks:
        submitted = (indices, [pool.submit(load, i) for i in indices])
        if pending is not None:
          yield assemble(pending[0], [f.result() for f in pending[1]])
        pending = submitted
      if pending is not None:
        yield assemble(pending[0], [f.result() for f in pending[1]])


def _nearest_resize(label_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resampling of an int map [H, W] to `size`, sampling pixel centres."""
  if label_map.shape == tuple(size):
    return label_map
  rows = ((np.arange(size[0]) + 0.5) * label_map.shape[0] / size[0]).astype(np.int64)
  cols = ((np.arange(size[1]) + 0.5) * label_map.shape[1] / size[1]).astype(np.int64)
  return label_map[np.minimum(rows, label_map.shape[0] - 1)][:, np.minimum(cols,
                                                                          label_map.shape[1] - 1)]
