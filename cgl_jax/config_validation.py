"""Checks a run's config against its model and devices BEFORE anything is compiled.

A bad config must fail in a second with a message naming the key, what was expected and what was
given, not minutes later inside XLA. `validate_config` needs only the model's static conv-layer
description (`model.conv_layers()`), not its parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import ml_collections

LAMBDA_KEYS = ('lambda_bn', 'lambda_g', 'lambda_s', 'lambda_o')

_CHOICES = {
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'optimizer.name': ('sgd', 'adamw'),
    'optimizer.schedule': ('step', 'warmup_cosine', 'constant'),
    'cgl.pairs': ('sampled', 'exact'),
    'cgl.reduction': ('per_sample', 'pooled'),
    'cgl.bn_mask': ('paper', 'code'),
    'dissect.checkpoint': ('latest', 'best'),
}


class ConfigError(ValueError):
  """A config value that cannot work with this model or these devices."""


def _get(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for key in dotted.split('.'):
    value = value[key]
  return value


def validate_config(config: ml_collections.ConfigDict, *, conv_layers: Sequence,
                    device_count: int, process_count: int = 1) -> None:
  """Raises `ConfigError` naming the first problem found; returns None for a usable config.

  Args:
    config: the run config (schema: configs/default.py).
    conv_layers: `model.conv_layers()` (each has `.name` and `.features`).
    device_count: `jax.device_count()` (global batches are split over all devices).
    process_count: `jax.process_count()`.
  """
  model_name = config.model.name
  names = [layer.name for layer in conv_layers]
  features = {layer.name: layer.features for layer in conv_layers}

  for key, allowed in _CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise ConfigError(f'config.{key} must be one of {allowed}, got {value!r}')

  for key in LAMBDA_KEYS:
    value = config.cgl[key]
    if not value >= 0:  # also rejects NaN
      raise ConfigError(f'config.cgl.{key} must be >= 0, got {value}')
  if config.optimizer.learning_rate <= 0:
    raise ConfigError(f'config.optimizer.learning_rate must be > 0, '
                      f'got {config.optimizer.learning_rate}')
  if config.optimizer.weight_decay < 0:
    raise ConfigError(f'config.optimizer.weight_decay must be >= 0, '
                      f'got {config.optimizer.weight_decay}')

  for key in ('cgl.layers', 'dissect.layers'):
    if key == 'dissect.layers' and not config.dissect.enabled:
      continue
    for layer in _get(config, key):
      if layer not in features:
        raise ConfigError(f'config.{key}: unknown layer {layer!r} for model {model_name!r}; '
                          f'available: {", ".join(names)}')

  if config.dissect.enabled:
    from cgl_jax.dissect import measurement  # pylint: disable=g-import-not-at-top  (jax)
    try:
      measurement.resolve(config.dissect)
    except ValueError as error:
      raise ConfigError(str(error)) from None

  if (config.cgl.lambda_g > 0 or config.cgl.lambda_s > 0) and not config.cgl.layers:
    raise ConfigError('config.cgl.layers is empty, but lambda_g or lambda_s is > 0: name the '
                      f'layers that get L_g and L_s (available: {", ".join(names)})')
  groups = config.cgl.num_groups
  if groups < 1:
    raise ConfigError(f'config.cgl.num_groups must be >= 1, got {groups}')
  grouped = []  # (layer, minimum filters per group) that the active terms need
  if config.cgl.lambda_bn > 0:
    grouped += [(name, 1) for name in names]  # R_bn groups every conv kernel
  if config.cgl.lambda_g > 0:
    grouped += [(name, 2) for name in config.cgl.layers]  # L_g compares pairs i != j
  for name, min_per_group in grouped:
    if groups > features[name]:
      raise ConfigError(
          f'config.cgl.num_groups={groups} exceeds the {features[name]} filters of layer '
          f'{name!r} of model {model_name!r}: G must be <= C (groups of floor(C/G) filters)')
    if features[name] // groups < min_per_group:
      raise ConfigError(
          f'config.cgl.num_groups={groups} leaves {features[name] // groups} filter per group '
          f'in layer {name!r} ({features[name]} filters); L_g needs >= 2 per group')
  num_pairs = config.cgl.num_pairs
  if num_pairs is not None and num_pairs < 1:
    raise ConfigError(f'config.cgl.num_pairs must be None (3·f) or >= 1, got {num_pairs}')

  for key in ('batch_size', 'eval_batch_size'):
    size = config[key]
    if size < 1 or size % device_count:
      raise ConfigError(
          f'config.{key}={size} is not divisible by the {device_count} devices '
          f'(jax.device_count()); use a positive multiple of {device_count}')
    if size % process_count:
      raise ConfigError(f'config.{key}={size} is not divisible by the {process_count} '
                        'processes (jax.process_count())')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError('set config.num_train_steps > 0 or config.num_epochs > 0, got '
                      f'{config.num_train_steps} and {config.num_epochs}')
  if config.keep_checkpoints < 1:
    raise ConfigError(f'config.keep_checkpoints must be >= 1, got {config.keep_checkpoints}')
