"""ResNet-18 (basic blocks, as torchvision) with an ImageNet or a CIFAR stem.

    stem 'imagenet': conv 7×7/2 pad 3 (64) → BN → ReLU → maxpool 3/2 pad 1     224 → 56
    stem 'cifar':    conv 3×3/1 pad 1 (64) → BN → ReLU (no pool)                32 → 32
    layer1 … layer4: 2 basic blocks each, widths 64, 128, 256, 512, the first block of
      layers 2–4 has stride 2 and a projection shortcut (1×1 conv/2 → BN)
    → global average pool → FC K

Basic block `layer{s}_block{b}`:  y = ReLU(BN(conv2(ReLU(BN(conv1(x))))) + shortcut(x)).

Every conv is followed by BN, so every sown value is a BN output (before ReLU / the residual add)
and every `ConvLayer` has a γ path. γ is initialised to 1 everywhere (torchvision default; no
zero-init of the last BN of a block, which would make the BN soft mask y/γ degenerate).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cgl_jax.models import layers

STEMS = ('imagenet', 'cifar')
_STAGE_SIZES = (2, 2, 2, 2)  # basic blocks per stage
_STAGE_WIDTHS = (64, 128, 256, 512)


class _Block(NamedTuple):
  """One basic block: its conv names, width, stride and whether it projects the shortcut."""
  name: str  # layer{s}_block{b}
  features: int
  strides: int
  projection: bool

  def convs(self) -> tuple[str, ...]:
    """Its sown conv names, in forward order."""
    names = (f'{self.name}_conv1', f'{self.name}_conv2')
    return names + ((f'{self.name}_shortcut',) if self.projection else ())


class ResNet18(nn.Module):
  """ResNet-18; sows `stem`, `layer{1..4}_block{0,1}_conv{1,2}` and `layer{2..4}_block0_shortcut`.

  Attributes:
    num_classes: K.
    stem: 'imagenet' (7×7/2 conv + maxpool) or 'cifar' (3×3/1 conv, no pool).
    width_multiplier: scales every width (1.0 = 64-128-256-512; small values for tests).
    dtype: compute dtype; params stay float32, logits are float32.
  """
  num_classes: int
  stem: str = 'imagenet'
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.stem not in STEMS:
      raise ValueError(f"ResNet18.stem must be one of {STEMS}, got '{self.stem}'")
    super().__post_init__()

  def _blocks(self) -> tuple[_Block, ...]:
    blocks = []
    in_features = self._width(_STAGE_WIDTHS[0])
    for stage, (num_blocks, width) in enumerate(zip(_STAGE_SIZES, _STAGE_WIDTHS), 1):
      features = self._width(width)
      for index in range(num_blocks):
        strides = 2 if stage > 1 and index == 0 else 1
        blocks.append(_Block(f'layer{stage}_block{index}', features, strides,
                             projection=strides != 1 or in_features != features))
        in_features = features
    return tuple(blocks)

  def _width(self, features: int) -> int:
    return layers.scaled_width(features, self.width_multiplier)

  def conv_layers(self) -> tuple[layers.ConvLayer, ...]:
    stem = layers.ConvLayer.create('stem', features=self._width(_STAGE_WIDTHS[0]),
                                   batch_norm=True)
    return (stem,) + tuple(
        layers.ConvLayer.create(name, features=block.features, batch_norm=True)
        for block in self._blocks() for name in block.convs())

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:

    def conv(x, *, name, features, kernel_size, strides=1, padding):
      return layers.SownConv(features, kernel_size=kernel_size, strides=strides,
                             padding=padding, batch_norm=True, dtype=self.dtype,
                             name=name)(x, train=train)

    x = x.astype(self.dtype)
    stem_features = self._width(_STAGE_WIDTHS[0])
    if self.stem == 'imagenet':
      x = nn.relu(conv(x, name='stem', features=stem_features, kernel_size=7, strides=2,
                       padding=3))
      x = layers.max_pool(x, window=3, stride=2, padding=1)
    else:
      x = nn.relu(conv(x, name='stem', features=stem_features, kernel_size=3, padding=1))
    for block in self._blocks():
      conv1, conv2, *shortcut = block.convs()
      y = nn.relu(conv(x, name=conv1, features=block.features, kernel_size=3,
                       strides=block.strides, padding=1))
      y = conv(y, name=conv2, features=block.features, kernel_size=3, padding=1)
      if shortcut:
        x = conv(x, name=shortcut[0], features=block.features, kernel_size=1,
                 strides=block.strides, padding=0)
      x = nn.relu(y + x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)
