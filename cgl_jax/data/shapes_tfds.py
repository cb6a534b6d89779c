"""tfds builder ``cgl_shapes``: the synthetic shapes dataset, generated locally.

Importing this module registers the builder, after which

    tfds.load('cgl_shapes/binary', data_dir=...)       # or 'cgl_shapes/classes45'

generates the dataset on first use (with tfds' progress bars; nothing is
downloaded) and reads it back from ``data_dir`` afterwards. Images, labels and
masks are exactly those of `cgl_jax.data.shapes.generate` for the config's
seed and sizes.

Features per example:
  image      uint8 [64, 64, 3]
  label      ClassLabel, `shapes.class_names(setting)`
  color_map  uint8 [64, 64, 1]: 0 = background, 1 + index into shapes.COLORS
  shape_map  uint8 [64, 64, 1]: 0 = background, 1 + index into shapes.SHAPES
The 15 concept masks are `shapes.concept_masks(color_map[..., 0], shape_map[..., 0])`.

Configs ``binary`` and ``classes45`` are the paper's sizes (640 images per class,
23,040 train / 5,760 validation); ``binary_tiny`` and ``classes45_tiny`` (10 per
class: 360 / 90) build in about a second for tests and smoke runs. Other sizes:
``tfds.builder('cgl_shapes', config=CglShapesConfig(name=..., ...))`` with a
new name (the name is the directory the data is cached under).
"""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from cgl_jax.data import shapes

_CHUNK = 1024  # images rendered at once while writing (bounds memory)

_DESCRIPTION = """\
Synthetic images of the Concept Group Learning paper (Varshneya et al., IJCAI
2021): 64×64 RGB, white background, two filled shapes (square, circle,
triangle; about 12 px) in pure red, green or blue, one in the top half and one
in the bottom half. Labels: `binary` (is a square present) or `classes45` (the
unordered pair of (colour, shape) items). `color_map` and `shape_map` give the
ground-truth concept of every pixel, for network dissection.
"""

_CITATION = """\
@inproceedings{varshneya2021cgl,
  title     = {Learning Interpretable Concept Groups in {CNN}s},
  author    = {Varshneya, Saurabh and Ledent, Antoine and Vandermeulen, Robert A.
               and Lei, Yunwen and Enders, Matthias and Borth, Damian and Kloft, Marius},
  booktitle = {Proceedings of the Thirtieth International Joint Conference on
               Artificial Intelligence (IJCAI)},
  year      = {2021},
}
"""


@dataclasses.dataclass(eq=False, kw_only=True)
class CglShapesConfig(tfds.core.BuilderConfig):
  """A label setting and the generator's sizes and seed.

  Attributes:
    setting: 'binary' (is a square present) or 'classes45' (the item pair).
    images_per_class: images per classes45 class over both splits.
    train_fraction: fraction of each class in the train split.
    seed: generator seed (`shapes.sample_layout`).
  """
  setting: str = 'binary'
  images_per_class: int = 640
  train_fraction: float = 0.8
  seed: int = 0

  def __post_init__(self):
    if self.setting not in shapes.SETTINGS:
      raise ValueError(f'CglShapesConfig {self.name!r}: setting must be one of '
                       f'{shapes.SETTINGS}; got {self.setting!r}.')
    self.sizes()  # validates images_per_class and train_fraction
    if not self.description:
      sizes = self.sizes()
      self.description = (
          f'{self.setting} labels; {self.images_per_class} images per item pair '
          f'({sizes["train"]} train / {sizes["validation"]} validation), seed {self.seed}.')

  def sizes(self) -> dict[str, int]:
    """Images per classes45 class in each split."""
    return shapes.split_sizes(images_per_class=self.images_per_class,
                              train_fraction=self.train_fraction)

  def generator_kwargs(self) -> dict:
    return dict(seed=self.seed, images_per_class=self.images_per_class,
                train_fraction=self.train_fraction)


_TINY_IMAGES_PER_CLASS = 10


class CglShapes(tfds.core.GeneratorBasedBuilder):
  """The synthetic shapes of the CGL paper, with pixel-exact concept label maps."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: 64×64 images of two coloured shapes, '
               'binary and classes45 labels, colour and shape label maps.',
  }
  BUILDER_CONFIGS = [
      CglShapesConfig(name='binary', setting='binary'),
      CglShapesConfig(name='classes45', setting='classes45'),
      CglShapesConfig(name='binary_tiny', setting='binary',
                      images_per_class=_TINY_IMAGES_PER_CLASS),
      CglShapesConfig(name='classes45_tiny', setting='classes45',
                      images_per_class=_TINY_IMAGES_PER_CLASS),
  ]
  DEFAULT_CONFIG_NAME = 'binary'

  def __init__(self, *, config=None, **kwargs):
    if isinstance(config, CglShapesConfig):
      _check_not_shadowing_a_builtin(config, self.BUILDER_CONFIGS)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = shapes.IMAGE_SIZE
    label_map = lambda what: tfds.features.Image(
        shape=(size, size, 1), use_colormap=True,
        doc=f'uint8 label map: 0 = background, 1 + index into {what}.')
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3)),
            'label': tfds.features.ClassLabel(
                names=shapes.class_names(self.builder_config.setting)),
            'color_map': label_map(shapes.COLORS),
            'shape_map': label_map(shapes.SHAPES),
        }),
        supervised_keys=('image', 'label'),
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated locally
    return {split: self._generate_examples(split) for split in shapes.SPLITS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    layout = shapes.sample_layout(split, **config.generator_kwargs())
    for start in range(0, len(layout), _CHUNK):
      chunk = shapes.draw(layout[start:start + _CHUNK], config.setting)
      for offset in range(len(chunk)):
        yield start + offset, {
            'image': chunk.images[offset],
            'label': chunk.labels[offset],
            'color_map': chunk.color_map[offset, :, :, None],
            'shape_map': chunk.shape_map[offset, :, :, None],
        }


def _check_not_shadowing_a_builtin(config: CglShapesConfig, builtins) -> None:
  """A custom config must not reuse a built-in name: the name is the cache directory."""
  for builtin in builtins:
    if builtin.name == config.name and (builtin.setting, builtin.generator_kwargs()) != (
        config.setting, config.generator_kwargs()):
      raise ValueError(
          f'CglShapesConfig name {config.name!r} is a built-in config with '
          f'setting={builtin.setting!r}, {builtin.generator_kwargs()}; got '
          f'setting={config.setting!r}, {config.generator_kwargs()}. Give a '
          'custom config a new name: data is cached under it.')
