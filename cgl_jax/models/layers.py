"""Building blocks shared by every model: the sown conv(+BN) layer and its description.

Each conv layer is one `SownConv` module, a direct child of the model, named after the layer.
For a layer named `NAME`:

    variables['params'][NAME]['kernel']             the conv kernel [kh, kw, C_in, C_out]
    variables['params'][NAME]['bias']               the conv bias [C_out]   (no-BN layers only)
    variables['params'][NAME]['bn']['scale']        the BN γ [C_out]        (BN layers only)
    variables['batch_stats'][NAME]['bn']            BN running mean / var   (BN layers only)
    state['intermediates'][NAME]['pre_activation']  the sown output [B, H', W', C_out]
                                                    (`models.get_intermediates` keys it NAME)

The forward computation (`SownConv`) and the static description used by regularisers, config
validation and dissection (`ConvLayer.create`) share these names through the constants below.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Key under which each SownConv sows its output, inside its own scope.
SOWN_KEY = 'pre_activation'
BN_NAME = 'bn'

# He-normal with fan_out, as torchvision initialises the convs of VGG and ResNet.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Parameter initialisations a model can be built with (its `initializer` attribute):
#   'he_normal'  conv kernels He-normal (fan_out), biases 0; dense layers flax's default
#                (LeCun-normal kernel, bias 0);
#   'pytorch'    PyTorch's default for nn.Conv2d and nn.Linear, which the CGL authors' synthetic
#                models keep: kaiming_uniform(a=√5) kernels, i.e. U(±1/√fan_in), and biases
#                U(±1/√fan_in), fan_in = k·k·C_in (conv) or the input width (dense).
INITIALIZERS = ('he_normal', 'pytorch')
_pytorch_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def check_initializer(initializer: str) -> None:
  if initializer not in INITIALIZERS:
    raise ValueError(f'config.model.kwargs.initializer must be one of {INITIALIZERS}, got '
                     f'{initializer!r}')


def _pytorch_bias_init(fan_in: int):
  """U(±1/√fan_in), PyTorch's default bias of nn.Conv2d / nn.Linear."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dense_inits(initializer: str, *, fan_in: int) -> dict[str, Any]:
  """kernel_init / bias_init keywords of `nn.Dense` for `initializer` ({} = flax's default)."""
  check_initializer(initializer)
  if initializer == 'pytorch':
    return {'kernel_init': _pytorch_kernel_init, 'bias_init': _pytorch_bias_init(fan_in)}
  return {}

# torchvision's BatchNorm2d defaults: momentum 0.1 (flax counts the other way) and eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class ConvLayer:
  """Static description of one sown conv layer (no parameters needed to build it).

  Attributes:
    name: the name `models.get_intermediates` gives its sown pre-activation.
    kernel_path: keys into `variables['params']` reaching the [kh, kw, C_in, C_out] kernel.
    features: C_out, the number of filters (and of channels of the sown value).
    bn_scale_path: keys into `variables['params']` reaching the BN γ [C_out] when the sown value
      is a batch-norm output (γ·(x − μ)/σ + β); None when it is the raw conv output.
  """
  name: str
  kernel_path: tuple[str, ...]
  features: int
  bn_scale_path: tuple[str, ...] | None = None

  @classmethod
  def create(cls, name: str, *, features: int, batch_norm: bool) -> 'ConvLayer':
    """The description of `SownConv(features, batch_norm=batch_norm, name=name)`."""
    return cls(name=name, kernel_path=(name, 'kernel'), features=features,
               bn_scale_path=(name, BN_NAME, 'scale') if batch_norm else None)


def scaled_width(features: int, multiplier: float) -> int:
  """round(features · multiplier), at least 1: shrinks a network for tests or ablations."""
  if multiplier <= 0:
    raise ValueError(f'width_multiplier must be > 0, got {multiplier}')
  return max(1, int(round(features * multiplier)))


class SownConv(nn.Module):
  """Square conv (+ BN) that sows and returns its PRE-activation (apply ReLU yourself).

  y = conv(x, W) + b                      without BN
  y = γ · (conv(x, W) − μ) / √(σ² + ε) + β  with BN (the conv then has no bias: β replaces it)

  Attributes:
    features: C_out.
    kernel_size: kernel side k.
    strides: stride s.
    padding: symmetric zero padding p (torch semantics): H' = floor((H + 2p − k) / s) + 1.
    batch_norm: add BN after the conv. BN uses batch statistics when `train`, running averages
      otherwise. No `axis_name` is needed for data parallelism: under `jax.jit` with a
      batch-sharded `NamedSharding`, the batch mean and variance are reductions over the GLOBAL
      batch array, which XLA computes across devices.
    dtype: compute dtype; the kernel (and BN) parameters are stored in float32.
    initializer: 'he_normal' | 'pytorch' (`INITIALIZERS`); BN parameters start at γ = 1,
      β = 0 either way.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  batch_norm: bool = False
  dtype: Any = jnp.float32
  initializer: str = 'he_normal'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, H, W, C_in] → [B, H', W', features] in `dtype`; also sown as SOWN_KEY."""
    k, s, p = self.kernel_size, self.strides, self.padding
    check_initializer(self.initializer)
    pytorch = self.initializer == 'pytorch'
    kernel = self.param('kernel', _pytorch_kernel_init if pytorch else conv_kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(s, s),
        padding=((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.batch_norm:
      y = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       dtype=self.dtype, name=BN_NAME)(y)
    else:
      bias_init = (_pytorch_bias_init(k * k * x.shape[-1]) if pytorch
                   else nn.initializers.zeros)
      y = y + self.param('bias', bias_init, (self.features,), jnp.float32).astype(self.dtype)
    self.sow('intermediates', SOWN_KEY, y)
    return y


def max_pool(x: jax.Array, *, window: int, stride: int, padding: int = 0) -> jax.Array:
  """torch.nn.MaxPool2d(window, stride, padding): pads with −∞, floor output size."""
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging matrix of torch's adaptive average pooling along one axis.

  Output cell i averages the inputs [floor(i·n/m), ceil((i+1)·n/m)) for n inputs, m outputs;
  cells overlap when n is not a multiple of m, and inputs repeat when m > n.
  """
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, output_size: int) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d(output_size) on NHWC: [B, H, W, C] → [B, m, m, C].

  Written as two small matmuls with static pooling matrices A_h [m, H], A_w [m, W]:
  out[b, i, j, c] = Σ_h Σ_w A_h[i, h] · A_w[j, w] · x[b, h, w, c]. The identity when H = W = m.
  """
  _, height, width, _ = x.shape
  if (height, width) == (output_size, output_size):
    return x
  pool_h = jnp.asarray(_adaptive_pool_matrix(height, output_size), x.dtype)
  pool_w = jnp.asarray(_adaptive_pool_matrix(width, output_size), x.dtype)
  return jnp.einsum('ih,bhwc,jw->bijc', pool_h, x, pool_w)


def classifier_head(x: jax.Array, *, hidden: Sequence[int], num_classes: int,
                    dropout_rate: float, dropout_first: bool, train: bool,
                    dtype: Any, initializer: str = 'he_normal') -> jax.Array:
  """Flatten → [Dropout → Dense → ReLU] per hidden size → Dense(num_classes), float32 logits.

  `dropout_first=True` is torchvision's AlexNet order (dropout before each hidden dense);
  `False` is VGG's (dropout after each hidden ReLU). Dropout needs `rngs={'dropout': key}`
  when `train`. Call it from inside the model's compact method: the Dense layers become
  children of the model, named fc1, fc2, …, the last one `head`. `initializer`: see
  `INITIALIZERS` ('he_normal' keeps flax's Dense default).
  """
  x = x.reshape((x.shape[0], -1))
  for index, features in enumerate(hidden, start=1):
    if dropout_first:
      x = nn.Dropout(dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(features, dtype=dtype, name=f'fc{index}',
                         **dense_inits(initializer, fan_in=x.shape[-1]))(x))
    if not dropout_first:
      x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  logits = nn.Dense(num_classes, dtype=dtype, name='head',
                    **dense_inits(initializer, fan_in=x.shape[-1]))(x)
  return logits.astype(jnp.float32)
