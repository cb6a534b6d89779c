"""Dissecting R runs of one model together: R runs × C units are probed as R·C units.

    results = dissect.multirun.compute_runs(model, stacked_variables, data, settings)
    results[r]                                   # == dissect.compute(model, variables_r, data, settings)

Network Dissection treats every unit on its own: its threshold T_k is a quantile of its own
activations, its IoU counts are sums over its own masks. So R runs of the same architecture
(e.g. the stacked state of `cgl_jax.multirun`) can share one pass over the probe set: the forward
pass goes over the runs (`StackedRuns`) and lays their maps side by side on the channel axis,
unit c of run r becoming unit r·C + c; thresholds, tallies and top images are the single-run
machinery of `probe.dissect_layers`, run once for all R·C units; the per-unit results are then
split back into R `DissectionResult`s (`results.assemble`). The probe set is read once per pass
instead of R times.

Each run's result equals its single-run `dissect.compute` exactly when the stacked forward pass
gives each run bit-identical activations. With run_axis 'unroll' (the default: one run's
convolutions R times in one executable) or 'map' (`lax.map` over the runs) that holds on the
CPU; 'vmap' (one batched computation, grouped convolutions) may round differently in the last
bit, which can move a threshold and the counts at it.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cgl_jax import models
from cgl_jax.data import broden as broden_lib
from cgl_jax.dissect import probe
from cgl_jax.dissect import results as results_lib
from cgl_jax.dissect import tally as tally_lib
from cgl_jax.dissect.settings import DissectionSettings

RUN_AXES = ('unroll', 'map', 'vmap')


@dataclasses.dataclass(frozen=True)
class StackedRuns:
  """R runs of `model` as one model whose sown conv maps hold every run's units.

  `apply(stacked_variables, x, train=False, mutable=['intermediates'])` runs the model once per
  run on the same images x and sows, per conv layer, float [b, h, w, R·C] with run r's unit c at
  channel r·C + c (the layout `probe.dissect_layers` tallies). `stacked_variables` has a leading
  axis R on every leaf. Only evaluation mode is supported.

  Attributes:
    model: the runs' model (a `cgl_jax.models` model).
    num_runs: R.
    run_axis: how the forward pass goes over the runs: 'unroll' (default: R copies of one
      run's forward pass in one executable), 'map' (`lax.map`, one loop body; on the CPU XLA's
      convolutions inside a loop are many times slower) or 'vmap' (one batched computation,
      grouped convolutions).
  """
  model: Any
  num_runs: int
  run_axis: str = 'unroll'

  def __post_init__(self):
    if self.run_axis not in RUN_AXES:
      raise ValueError(f'run_axis must be one of {RUN_AXES}; got {self.run_axis!r}')
    if not isinstance(self.num_runs, int) or self.num_runs < 1:
      raise ValueError(f'num_runs must be a positive integer; got {self.num_runs!r}')

  def conv_layers(self):
    """The model's conv layers, each with R·C features."""
    return tuple(dataclasses.replace(layer, features=layer.features * self.num_runs)
                 for layer in self.model.conv_layers())

  def apply(self, variables, x, *, train: bool = False, mutable=('intermediates',)):
    if train or list(mutable) != ['intermediates']:
      raise ValueError("StackedRuns.apply supports train=False, mutable=['intermediates'] only")

    def one(run_variables):
      logits, state = self.model.apply(run_variables, x, train=False, mutable=['intermediates'])
      return logits, models.get_intermediates(state)

    if self.run_axis == 'vmap':
      logits, sown = jax.vmap(one)(variables)
    elif self.run_axis == 'map':
      logits, sown = jax.lax.map(one, variables)
    else:
      outputs = [one(jax.tree.map(lambda leaf, r=run: leaf[r], variables))
                 for run in range(self.num_runs)]
      logits, sown = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)
    # [R, b, h, w, C] → [b, h, w, R·C], run-major.
    joined = {name: jnp.moveaxis(maps, 0, -2).reshape(*maps.shape[1:4], -1)
              for name, maps in sown.items()}
    return logits, {'intermediates': {name: {'pre_activation': (maps,)}
                                      for name, maps in joined.items()}}


def num_runs_of(stacked_variables) -> int:
  """R, the common leading axis of every leaf of `stacked_variables`."""
  sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(stacked_variables)}
  if len(sizes) != 1:
    raise ValueError(f'stacked variables must share one leading run axis; got sizes {sizes}')
  return sizes.pop()


def split_layer(layer: probe.LayerDissection, run: int,
                num_runs: int) -> probe.LayerDissection:
  """Run `run`'s units of a layer probed for R·C units (run-major)."""
  units = len(layer.thresholds) // num_runs
  part = slice(run * units, (run + 1) * units)
  counts = tally_lib.TallyCounts(labels=layer.counts.labels, units=layer.counts.units[part],
                                 units_cat=layer.counts.units_cat[part],
                                 both=layer.counts.both[part])
  return probe.LayerDissection(
      thresholds=layer.thresholds[part], threshold_error_bound=layer.threshold_error_bound[part],
      counts=counts, top_indices=layer.top_indices[part], top_values=layer.top_values[part],
      map_size=layer.map_size)


def compute_runs(model, stacked_variables, data: broden_lib.Broden,
                 settings: DissectionSettings, *, run_axis: str = 'unroll',
                 show_progress: bool = True) -> list[results_lib.DissectionResult]:
  """Dissects R runs of `model` in one set of passes over `data`.

  Args:
    model: the runs' model.
    stacked_variables: {'params': …[, 'batch_stats': …]} with a leading axis R on every leaf
      (e.g. `multirun.MultiRunState.params` wrapped as {'params': state.params}).
    data, settings: as for `dissect.compute`.
    run_axis: see `StackedRuns`.
    show_progress: progress bars on stderr.

  Returns:
    R `DissectionResult`s, run order; `seconds` of each is the shared wall time divided by R.
  """
  start = time.perf_counter()
  num_runs = num_runs_of(stacked_variables)
  stacked = StackedRuns(model, num_runs, run_axis)
  probed, top_maps = results_lib.probe_layers(stacked, stacked_variables, data, settings,
                                              show_progress=show_progress)
  seconds = (time.perf_counter() - start) / num_runs
  results = []
  for run in range(num_runs):
    params = jax.tree.map(lambda leaf: np.asarray(leaf[run]), stacked_variables['params'])
    run_probed = {name: split_layer(probed[name], run, num_runs) for name in probed}
    run_maps = {name: np.split(top_maps[name], num_runs)[run] for name in top_maps}
    results.append(results_lib.assemble(model, params, data, settings, run_probed, run_maps,
                                        seconds=seconds))
  return results


def stack_variables(variables: Sequence[Any]):
  """R single-run variable trees → one tree with a leading run axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *variables)
