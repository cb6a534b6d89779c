"""Glue between a config and `losses`: the named, unweighted CGL terms of one forward pass.

    r_bn    Σ_{every conv kernel W} Σ_g ‖W_g‖_F                 (block_norm, G = cgl.num_groups)
    l_g     mean_{l ∈ cgl.layers} Σ_g group_coherence(ψ_l)_g
    l_s     mean_{l ∈ cgl.layers} spatial_concentration(ψ_l)
    r_orth  Σ_{every conv kernel W} ‖W Wᵀ − I‖_F

Soft masks ψ_l come from the sown pre-activations (`models.get_intermediates`):
- plain conv layers: `losses.soft_masks` (per-channel std over the global batch);
- batch-norm layers (`ConvLayer.bn_scale_path` set): `losses.soft_masks_bn`, dividing the BN output
  by γ from the params (`cgl.bn_mask='paper'`) or by the BN running variance from `batch_stats`
  (`'code'`, the authors' code).
P1, P2 are the config's fixed `cgl.p1`, `cgl.p2`, or, with `cgl.learn_p`, learned scalars that the
trainer keeps OUTSIDE the model params, in `TrainState.cgl = {'p1', 'p2'}` (see
`init_soft_mask_params`), so the model's variables stay exactly what `model.apply` expects.

Sampled pairs: the caller passes a fresh key per step (the trainer: fold_in(seed key, step));
layer k uses fold_in(key, k), so the layers draw independent pairs.

Kernels: L_g's pair sums and L_s's per-map values can run on faster implementations
(`cgl_jax.kernels`); `resolve_kernels` turns `cgl.kernels` ('auto', 'jnp' or a name) into the
ones `cgl_terms` passes to `losses`, once per run.

train.py multiplies each term by its λ (`weighted_sum`) and logs them; only terms with λ > 0 are
computed (`active_terms`), so a cross-entropy baseline pays nothing for them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from cgl_jax import kernels as kernels_lib
from cgl_jax import losses
from cgl_jax.tree_util import lookup

# Term name → its weight's key in config.cgl (also the order terms are computed and logged in).
TERM_LAMBDAS = {'r_bn': 'lambda_bn', 'l_g': 'lambda_g', 'l_s': 'lambda_s', 'r_orth': 'lambda_o'}
_MASK_TERMS = ('l_g', 'l_s')  # terms that need the sown activations


def active_terms(cgl_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the terms whose λ is > 0, in `TERM_LAMBDAS` order."""
  return tuple(name for name, key in TERM_LAMBDAS.items() if cgl_config[key] > 0)


def needs_intermediates(cgl_config: ml_collections.ConfigDict) -> bool:
  """Whether the active terms read sown activations (else the forward pass need not keep them)."""
  return any(name in _MASK_TERMS for name in active_terms(cgl_config))


def weighted_sum(cgl_config: ml_collections.ConfigDict, terms: Mapping[str, jax.Array]) -> jax.Array:
  """Σ_name λ_name · terms[name] over the given terms (0 when there are none)."""
  total = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    total = total + cgl_config[TERM_LAMBDAS[name]] * value
  return total


def init_soft_mask_params(cgl_config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Initial learned P1, P2 ({'p1', 'p2'} float32 scalars) with `cgl.learn_p`, else {}."""
  if not cgl_config.learn_p:
    return {}
  return {'p1': jnp.asarray(cgl_config.p1, jnp.float32),
          'p2': jnp.asarray(cgl_config.p2, jnp.float32)}


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The implementations `cgl_terms` passes to `losses` (see `cgl_jax.kernels`)."""
  pair_sums_name: str
  per_map_name: str
  pair_sums: losses.PairSums
  per_map: losses.PerMap


def resolve_kernels(cgl_config: ml_collections.ConfigDict, *, platform: str | None = None,
                    num_devices: int | None = None) -> Kernels:
  """`cgl.kernels` ('auto', 'jnp' or a `cgl_jax.kernels.PAIR_SUMS` name) as callables; logs them.

  Args:
    cgl_config: `config.cgl`.
    platform: 'cpu', 'cuda', 'rocm', 'tpu', ... (default: that of the default device).
    num_devices: devices the batch is split over (default `jax.device_count()`).

  Raises:
    ValueError: an unknown name.
    cgl_jax.kernels.KernelUnavailableError: a named implementation cannot run here.
  """
  platform = platform or kernels_lib.current_platform()
  num_devices = jax.device_count() if num_devices is None else num_devices
  # ψ is computed in float32 for float32/bfloat16/float16 models.
  selection = kernels_lib.resolve(cgl_config.get('kernels', 'auto'), platform=platform,
                                  num_devices=num_devices, dtype=jnp.float32)
  logging.info('L_g pair sums: %s on %s; L_s per-map: %s', selection.pair_sums, platform,
               selection.per_map)
  return Kernels(selection.pair_sums, selection.per_map,
                 kernels_lib.pair_sums(selection.pair_sums), kernels_lib.per_map(selection.per_map))


def layer_soft_masks(cgl_config: ml_collections.ConfigDict, layer, activation: jax.Array, *,
                     params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None,
                     p1: jax.Array | float, p2: jax.Array | float) -> jax.Array:
  """ψ [B, H, W, C] (float32) of one sown layer, in the form its `ConvLayer` calls for."""
  if layer.bn_scale_path is None:
    return losses.soft_masks(activation, scale=p1, shift=p2)
  if cgl_config.bn_mask == 'paper':
    divisor = lookup(params, layer.bn_scale_path, what='params (BN scale γ)')
  elif cgl_config.bn_mask == 'code':
    var_path = (*layer.bn_scale_path[:-1], 'var')
    divisor = lookup(batch_stats or {}, var_path, what='batch_stats (BN running variance)')
  else:
    raise ValueError(f"config.cgl.bn_mask must be 'paper' or 'code', got {cgl_config.bn_mask!r}")
  return losses.soft_masks_bn(activation, divisor, scale=p1, shift=p2)


def cgl_terms(cgl_config: ml_collections.ConfigDict, *, params: Mapping[str, Any],
              intermediates: Mapping[str, jax.Array], conv_layers: Sequence, key: jax.Array,
              batch_stats: Mapping[str, Any] | None = None,
              soft_mask_params: Mapping[str, jax.Array] | None = None,
              terms: Sequence[str] | None = None,
              kernels: Kernels | None = None) -> dict[str, jax.Array]:
  """The unweighted CGL terms of one forward pass (scalars, float32).

  Args:
    cgl_config: `config.cgl` (layers, num_groups, pairs, num_pairs, reduction, bn_mask, λ, p1/p2).
    params: the model's `variables['params']` (kernels for R_bn/R_orth, γ for BN masks).
    intermediates: `{layer name: [B, H, W, C] pre-activation}` from `models.get_intermediates`;
      must hold every layer of `cgl_config.layers` when L_g or L_s is computed.
    conv_layers: `model.conv_layers()`; R_bn and R_orth cover ALL of them.
    key: PRNG key for the sampled pairs of L_g (fresh every step).
    batch_stats: the model's `variables['batch_stats']` (only for `bn_mask='code'`).
    soft_mask_params: learned {'p1', 'p2'}; None = the config's fixed p1, p2.
    terms: which terms to compute; None = `active_terms(cgl_config)` (those with λ > 0).
    kernels: the implementations of L_g's sampled pair sums and L_s's per-map values
      (`resolve_kernels`); None = the jax.numpy code of `losses`.

  Returns:
    `{name: scalar}` for each requested term, in `TERM_LAMBDAS` order.
  """
  requested = active_terms(cgl_config) if terms is None else tuple(terms)
  unknown = sorted(set(requested) - set(TERM_LAMBDAS))
  if unknown:
    raise ValueError(f'unknown CGL terms {unknown}; known: {list(TERM_LAMBDAS)}')
  groups = cgl_config.num_groups
  result = {}
  if 'r_bn' in requested:
    result['r_bn'] = sum(
        losses.block_norm(lookup(params, layer.kernel_path, what='params'), groups)
        for layer in conv_layers)
  if any(name in requested for name in _MASK_TERMS):
    if soft_mask_params:
      p1, p2 = soft_mask_params['p1'], soft_mask_params['p2']
    else:
      p1, p2 = cgl_config.p1, cgl_config.p2
    by_name = {layer.name: layer for layer in conv_layers}
    coherence, concentration = [], []
    for index, name in enumerate(cgl_config.layers):
      if name not in intermediates:
        raise KeyError(f'config.cgl.layers names {name!r}, but the model sowed only '
                       f'{sorted(intermediates)} (was the forward pass run with '
                       "mutable=['intermediates']?)")
      psi = layer_soft_masks(cgl_config, by_name[name], intermediates[name], params=params,
                             batch_stats=batch_stats, p1=p1, p2=p2)
      if 'l_g' in requested:
        pairs_key = jax.random.fold_in(key, index) if cgl_config.pairs == 'sampled' else None
        coherence.append(losses.group_coherence(
            psi, groups, pairs=cgl_config.pairs, key=pairs_key, num_pairs=(
                cgl_config.num_pairs if cgl_config.pairs == 'sampled' else None),
            reduction=cgl_config.reduction, pair_sums=(
                kernels.pair_sums if kernels and cgl_config.pairs == 'sampled' else None)).sum())
      if 'l_s' in requested:
        concentration.append(losses.spatial_concentration(
            psi, per_map=kernels.per_map if kernels else None))
    if 'l_g' in requested:
      result['l_g'] = jnp.mean(jnp.stack(coherence))
    if 'l_s' in requested:
      result['l_s'] = jnp.mean(jnp.stack(concentration))
  if 'r_orth' in requested:
    result['r_orth'] = sum(
        losses.orthogonality(lookup(params, layer.kernel_path, what='params'))
        for layer in conv_layers)
  return {name: jnp.asarray(result[name], jnp.float32) for name in TERM_LAMBDAS
          if name in result}
