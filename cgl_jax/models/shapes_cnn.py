"""The paper's synthetic-data CNN (method.md, "Synthetic CNN").

    x [B, 64, 64, 3] → conv1 3×3 pad 1 → ReLU → maxpool 2 → conv2 3×3 pad 1 → ReLU
      → global average pool → dense K

The paper uses widths (128, 256); L_g and L_s act on conv2, R_bn on both convs.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cgl_jax.models import layers


class ShapesCNN(nn.Module):
  """Two-conv CNN; sows `conv1` [B, H, W, w1] and `conv2` [B, H/2, W/2, w2] (pre-ReLU).

  `initializer`: 'he_normal' (default) or 'pytorch' (PyTorch's default U(±1/√fan_in) kernels
  and biases of nn.Conv2d / nn.Linear, as the authors' synthetic models start); see
  `layers.INITIALIZERS`. (Not `init`: that name is flax's `Module.init`.)
  """
  num_classes: int
  widths: tuple[int, int] = (128, 256)
  dtype: Any = jnp.float32
  initializer: str = 'he_normal'

  def __post_init__(self):
    if len(self.widths) != 2:
      raise ValueError(f'ShapesCNN.widths needs 2 entries (conv1, conv2), got {self.widths}')
    super().__post_init__()

  def conv_layers(self) -> tuple[layers.ConvLayer, ...]:
    return tuple(layers.ConvLayer.create(f'conv{i}', features=w, batch_norm=False)
                 for i, w in enumerate(self.widths, start=1))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    conv1, conv2 = (layers.SownConv(layer.features, kernel_size=3, padding=1, dtype=self.dtype,
                                    initializer=self.initializer, name=layer.name)
                    for layer in self.conv_layers())
    x = nn.relu(conv1(x, train=train))
    x = layers.max_pool(x, window=2, stride=2)
    x = nn.relu(conv2(x, train=train))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head',
                    **layers.dense_inits(self.initializer, fan_in=x.shape[-1]))(x).astype(
                        jnp.float32)
