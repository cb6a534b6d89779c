"""AlexNet as in torchvision (the authors' model), and "AlexNet-B" with batch norm after each conv.

    x [B, 224, 224, 3]
      → conv1 11×11/4 pad 2 (64)  → ReLU → maxpool 3/2      55 → 27
      → conv2 5×5 pad 2 (192)     → ReLU → maxpool 3/2      27 → 13
      → conv3 3×3 pad 1 (384)     → ReLU
      → conv4 3×3 pad 1 (256)     → ReLU
      → conv5 3×3 pad 1 (256)     → ReLU → maxpool 3/2      13 → 6
      → adaptive average pool 6×6 → [Dropout 0.5 → FC 4096 → ReLU] × 2 → FC K

With `batch_norm=True` every conv is followed by BN (before the ReLU) and loses its bias; the
sown value is then the BN output and `conv_layers()` carries the γ path for the BN soft mask.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cgl_jax.models import layers


class _ConvSpec(NamedTuple):
  name: str
  features: int
  kernel_size: int
  strides: int
  padding: int
  pool_after: bool


_CONVS = (
    _ConvSpec('conv1', 64, 11, 4, 2, True),
    _ConvSpec('conv2', 192, 5, 1, 2, True),
    _ConvSpec('conv3', 384, 3, 1, 1, False),
    _ConvSpec('conv4', 256, 3, 1, 1, False),
    _ConvSpec('conv5', 256, 3, 1, 1, True),
)


class AlexNet(nn.Module):
  """AlexNet (batch_norm=False) or AlexNet-B (batch_norm=True); sows conv1 … conv5.

  Attributes:
    num_classes: K.
    batch_norm: BN after every conv (AlexNet-B); adds `batch_stats`.
    width_multiplier: scales every conv width (1.0 = the paper; small values for tests).
    hidden_features: width of the two hidden FC layers (4096 in the paper).
    dropout_rate: dropout before each hidden FC (needs `rngs={'dropout': key}` when training).
    dtype: compute dtype; params stay float32, logits are float32.
    initializer: 'he_normal' (default) | 'pytorch' (PyTorch's default U(±1/√fan_in) for every
      conv and linear layer, as the authors' AlexNet module starts); `layers.INITIALIZERS`.
  """
  num_classes: int
  batch_norm: bool = False
  width_multiplier: float = 1.0
  hidden_features: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  initializer: str = 'he_normal'

  def _features(self, spec: _ConvSpec) -> int:
    return layers.scaled_width(spec.features, self.width_multiplier)

  def conv_layers(self) -> tuple[layers.ConvLayer, ...]:
    return tuple(layers.ConvLayer.create(spec.name, features=self._features(spec),
                                         batch_norm=self.batch_norm) for spec in _CONVS)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    for spec in _CONVS:
      conv = layers.SownConv(self._features(spec), kernel_size=spec.kernel_size,
                             strides=spec.strides, padding=spec.padding,
                             batch_norm=self.batch_norm, dtype=self.dtype,
                             initializer=self.initializer, name=spec.name)
      x = nn.relu(conv(x, train=train))
      if spec.pool_after:
        x = layers.max_pool(x, window=3, stride=2)
    x = layers.adaptive_avg_pool(x, 6)
    return layers.classifier_head(
        x, hidden=(self.hidden_features,) * 2, num_classes=self.num_classes,
        dropout_rate=self.dropout_rate, dropout_first=True, train=train, dtype=self.dtype,
        initializer=self.initializer)
