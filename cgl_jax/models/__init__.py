"""Model registry: `create(name, **kwargs)` builds a Flax linen module by name.

Every model is NHWC, takes `num_classes` and `dtype` (compute dtype; params stay float32),
is called as `model.apply(variables, images, train=bool, mutable=[...], rngs={'dropout': key})`,
returns float32 logits, sows every conv's PRE-activation output under `'intermediates'` and
describes its convs statically with `model.conv_layers()` (see `layers.ConvLayer`).

Names: `shapes_cnn`, `alexnet`, `alexnet_bn` (AlexNet-B: `AlexNet(batch_norm=True)`), `vgg16`,
`resnet18` (`stem='imagenet'|'cifar'`). `from_config(config)` builds the model a run's config
describes.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from cgl_jax.models.alexnet import AlexNet
from cgl_jax.models import layers
from cgl_jax.models.layers import ConvLayer
from cgl_jax.models.resnet import ResNet18
from cgl_jax.models.shapes_cnn import ShapesCNN
from cgl_jax.models.vgg import VGG16

__all__ = ['AlexNet', 'ConvLayer', 'ResNet18', 'ShapesCNN', 'VGG16', 'available', 'create',
           'from_config', 'get_intermediates']

_REGISTRY: Mapping[str, Callable[..., nn.Module]] = {
    'shapes_cnn': ShapesCNN,
    'alexnet': functools.partial(AlexNet, batch_norm=False),
    'alexnet_bn': functools.partial(AlexNet, batch_norm=True),
    'vgg16': VGG16,
    'resnet18': ResNet18,
}


def available() -> tuple[str, ...]:
  """The names `create` accepts, sorted."""
  return tuple(sorted(_REGISTRY))


def create(name: str, **kwargs: Any) -> nn.Module:
  """Builds model `name` with the module attributes `kwargs` (e.g. num_classes, dtype).

  `dtype` may be given as a string ('bfloat16', as configs store it).

  Raises:
    ValueError: unknown `name` (the message lists `available()`), or a kwarg the model does not
      have (the message lists the model's attributes).
  """
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model '{name}'; available models: {', '.join(available())}")
  factory = _REGISTRY[name]
  if 'dtype' in kwargs:
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  model_cls = factory.func if isinstance(factory, functools.partial) else factory
  fixed = set(factory.keywords) if isinstance(factory, functools.partial) else set()
  fields = {f.name for f in dataclasses.fields(model_cls)} - {'parent', 'name'} - fixed
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"Model '{name}' ({model_cls.__name__}) has no option(s) {unknown}; "
                     f'its options are {sorted(fields)}')
  return factory(**kwargs)


def from_config(config: ml_collections.ConfigDict) -> nn.Module:
  """The model of a run's config: `create(config.model.name, num_classes=
  config.dataset.num_classes, dtype=config.model.dtype, **config.model.kwargs)`."""
  kwargs = dict(config.model.kwargs.to_dict()) if config.model.get('kwargs') else {}
  return create(config.model.name, num_classes=config.dataset.num_classes,
                dtype=config.model.dtype, **kwargs)


def get_intermediates(state: Mapping[str, Any]) -> dict[str, jax.Array]:
  """`{name: array}` from the mutable state returned by `apply(..., mutable=['intermediates'])`.

  Each `SownConv` named NAME sows into its own scope, so flax stores
  `state['intermediates'][NAME]['pre_activation'] = (array,)`; this returns `{NAME: array}`
  with the names of `model.conv_layers()` (in no guaranteed order: a dict returned from `jit`
  comes back with sorted keys; iterate `conv_layers()` for forward order). Anything else sown is
  keyed by its
  '/'-joined path. Flax's `sow` appends one entry per call, and each model is applied once per
  `apply`, so each tuple must hold exactly one value.

  Raises:
    KeyError: `state` has no 'intermediates' collection (apply was not told to make it mutable).
    ValueError: a value was sown more than once (the model was applied twice in one `apply`).
  """
  if 'intermediates' not in state:
    raise KeyError("state has no 'intermediates' collection; call model.apply(..., "
                   f"mutable=['intermediates', ...]) (state has: {sorted(state)})")
  flat = {}

  def visit(tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
    for key, value in tree.items():
      if isinstance(value, Mapping):
        visit(value, path + (key,))
        continue
      name = '/'.join(path if key == layers.SOWN_KEY and path else path + (key,))
      if not (isinstance(value, tuple) and len(value) == 1):
        count = len(value) if isinstance(value, tuple) else type(value).__name__
        raise ValueError(f"intermediate '{name}' was sown {count} times, expected once "
                         '(apply the model once per apply call)')
      flat[name] = value[0]

  visit(state['intermediates'], ())
  return flat
