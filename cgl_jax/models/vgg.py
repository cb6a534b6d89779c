"""VGG16 as in torchvision (configuration "D", no batch norm).

    x [B, 224, 224, 3] → 5 stages of 3×3 pad-1 convs, each stage followed by maxpool 2/2:
      stage 1: conv1_1, conv1_2 (64)      stage 2: conv2_1, conv2_2 (128)
      stage 3: conv3_1 … conv3_3 (256)    stage 4: conv4_1 … conv4_3 (512)
      stage 5: conv5_1 … conv5_3 (512)
      → adaptive average pool 7×7 → [FC 4096 → ReLU → Dropout 0.5] × 2 → FC K
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cgl_jax.models import layers

# (features, number of convs) per stage.
_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(nn.Module):
  """VGG16; sows conv{stage}_{index} for stages 1–5 (13 convs).

  Attributes:
    num_classes: K.
    width_multiplier: scales every conv width (1.0 = the paper; small values for tests).
    hidden_features: width of the two hidden FC layers (4096 in the paper).
    dropout_rate: dropout after each hidden FC (needs `rngs={'dropout': key}` when training).
    dtype: compute dtype; params stay float32, logits are float32.
    initializer: 'he_normal' (default) | 'pytorch' (PyTorch's layer default U(±1/√fan_in) for
      every conv and linear layer); `layers.INITIALIZERS`.
  """
  num_classes: int
  width_multiplier: float = 1.0
  hidden_features: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  initializer: str = 'he_normal'

  def _stages(self) -> tuple[tuple[layers.ConvLayer, ...], ...]:
    """Per stage, the ConvLayer of each of its convs (in forward order)."""
    return tuple(
        tuple(layers.ConvLayer.create(
            f'conv{stage}_{index}', features=layers.scaled_width(features, self.width_multiplier),
            batch_norm=False) for index in range(1, num_convs + 1))
        for stage, (features, num_convs) in enumerate(_STAGES, start=1))

  def conv_layers(self) -> tuple[layers.ConvLayer, ...]:
    return tuple(conv for stage in self._stages() for conv in stage)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    for stage in self._stages():
      for conv in stage:
        x = nn.relu(layers.SownConv(conv.features, kernel_size=3, padding=1, dtype=self.dtype,
                                    initializer=self.initializer, name=conv.name)(x, train=train))
      x = layers.max_pool(x, window=2, stride=2)
    x = layers.adaptive_avg_pool(x, 7)
    return layers.classifier_head(
        x, hidden=(self.hidden_features,) * 2, num_classes=self.num_classes,
        dropout_rate=self.dropout_rate, dropout_first=False, train=train, dtype=self.dtype,
        initializer=self.initializer)
