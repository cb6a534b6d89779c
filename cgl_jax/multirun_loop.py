"""The host loop of `multirun`: train R runs for whole epochs, checkpoint, resume, export.

    runs = multirun.grid({'baseline': dict(weight_decay=1e-4),
                          'cgl': dict(lambda_bn=1e-3, lambda_g=1e-2, lambda_s=1e-3)},
                         seeds=range(5))
    state = multirun_loop.train_runs(config, runs, workdir)
    model, variables, step = checkpoints.restore_model(multirun.run_config(config, runs[0]),
                                                       multirun_loop.run_dir(workdir, runs[0]))

Every epoch ends with the validation top-1 of every run on the device; each run keeps its
latest parameters and those of its best epoch (the first epoch at the maximum). Every
`checkpoint_every_epochs` epochs the stacked state goes to `workdir/multirun/<step>` (orbax);
the same command restarted resumes bit-exactly (every random choice depends on (seed, step)
only, and an epoch is always one call of the same compiled function). `workdir/runs.json`
records the runs and the shared config, and a rerun with others is refused. At the end every
run is exported to `workdir/runs/<name>/` in the layout of `checkpoints` (items 'model' of
its best and latest steps, the best also ranked best by `checkpoints.best_step` unless a
later step ties it) with its single-run config in `config.json`, and
`workdir/multirun_summary.json` gets every run's per-epoch history.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cgl_jax import checkpoints, train
from cgl_jax.data import device_data
from cgl_jax.multirun import HPARAMS, MultiRun, MultiRunState, RunSpec, run_config

STATE_SUBDIR = 'multirun'
RUNS_SUBDIR = 'runs'
RUNS_FILE = 'runs.json'
SUMMARY_FILE = 'multirun_summary.json'


def run_dir(workdir: str, spec: RunSpec) -> str:
  """The exported run's workdir (`checkpoints.restore_model` reads it)."""
  return os.path.join(os.path.abspath(workdir), RUNS_SUBDIR, spec.name)


def _manager(workdir: str) -> ocp.CheckpointManager:
  """The stacked state's manager: keeps the newest 2 steps of `workdir/multirun`, saves block."""
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), STATE_SUBDIR),
                               options=options)


def save_state(manager: ocp.CheckpointManager, state: MultiRunState) -> None:
  manager.save(int(state.step), args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore_state(manager: ocp.CheckpointManager, template: MultiRunState,
                  step: int) -> MultiRunState:
  """Checkpoint `step` in the structure, shapes and shardings of `template`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _write_json(path: str, value) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _check_same_runs(workdir: str, config: ml_collections.ConfigDict,
                     specs: Sequence[RunSpec]) -> None:
  """A workdir holds one set of runs of one config: a rerun must ask for the same (to resume).

  The config's seed and λ are not compared (the runs carry their own).
  """
  path = os.path.join(os.path.abspath(workdir), RUNS_FILE)
  shared = _flatten(json.loads(config.to_json_best_effort()))
  for key in ('seed', *(f'cgl.{name}' for name in HPARAMS[:-1]), 'optimizer.weight_decay'):
    shared.pop(key, None)
  wanted = {'runs': [dataclasses.asdict(spec) for spec in specs], 'config': shared}
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, wanted)
    return
  with open(path) as f:
    stored = json.load(f)
  if stored['runs'] != wanted['runs']:
    raise ValueError(f"{workdir} holds other runs ({RUNS_FILE}: {stored['runs']}); got "
                     f"{wanted['runs']}. Use a new workdir for a new set of runs.")
  changed = sorted(key for key in set(shared) | set(stored['config'])
                   if shared.get(key) != stored['config'].get(key))
  if changed:
    detail = ', '.join(f"{key}: {stored['config'].get(key)!r} → {shared.get(key)!r}"
                       for key in changed)
    raise ValueError(f'{workdir} holds runs of another config ({detail}). Use a new workdir, '
                     'or the config the runs were started with to resume them.')


def _run_slice(tree, index: int):
  return jax.tree.map(lambda x: np.asarray(x[index]), tree)


def export_runs(config: ml_collections.ConfigDict, specs: Sequence[RunSpec],
                state: MultiRunState, workdir: str, *, steps_per_epoch: int) -> list[str]:
  """Writes each run's best and latest model to `run_dir(workdir, spec)`; returns the dirs.

  Each dir gets `config.json` (`run_config`) and `checkpoints/<step>/` with the item 'model'
  = {'params', 'batch_stats'} of the best epoch (step best_epoch · steps_per_epoch) and of the
  latest step, each with its validation top-1 as orbax metrics (`checkpoints.BEST_METRIC`). A
  run's dir is replaced whole (written beside it, then renamed).
  """
  top1 = np.asarray(state.history['val_top1'])
  latest_step = int(state.step)
  dirs = []
  for index, spec in enumerate(specs):
    target = run_dir(workdir, spec)
    staging = os.path.join(os.path.dirname(target), f'.{spec.name}.tmp')
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    _write_json(os.path.join(staging, 'config.json'),
                json.loads(run_config(config, spec).to_json_best_effort()))
    saves = []
    best_epoch = int(state.best_epoch[index])
    if best_epoch > 0:
      saves.append((best_epoch * steps_per_epoch, _run_slice(state.best, index),
                    float(state.best_top1[index])))
    if latest_step and latest_step != best_epoch * steps_per_epoch:
      latest_top1 = float(top1[index, latest_step // steps_per_epoch - 1])
      saves.append((latest_step, _run_slice(
          {'params': state.params, 'batch_stats': state.batch_stats}, index), latest_top1))
    with checkpoints.create_manager(staging, keep=2, asynchronous=False) as manager:
      for step, model_item, value in saves:
        metrics = None if math.isnan(value) else {checkpoints.BEST_METRIC: value}
        manager.save(step, metrics=metrics, args=ocp.args.Composite(**{
            checkpoints.MODEL_ITEM: ocp.args.StandardSave(model_item)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    dirs.append(target)
  return dirs


def summary(specs: Sequence[RunSpec], state: MultiRunState,
            steps_per_epoch: int) -> dict[str, Any]:
  """JSON-ready: per run its spec, best top-1 and epoch, and the per-epoch history."""
  history = jax.tree.map(np.asarray, state.history)
  runs = {}
  for index, spec in enumerate(specs):
    runs[spec.name] = dict(
        spec=dataclasses.asdict(spec), best_val_top1=float(state.best_top1[index]),
        best_epoch=int(state.best_epoch[index]),
        history={name: [None if math.isnan(v) else float(v) for v in series[index]]
                 for name, series in history.items()})
  return dict(step=int(state.step), epochs=int(state.step) // steps_per_epoch, runs=runs)


def _check_finite(specs: Sequence[RunSpec], epoch: int, means: Mapping[str, Any]) -> None:
  for name, values in means.items():
    values = np.asarray(values)
    bad = [spec.name for spec, value in zip(specs, values) if not math.isfinite(value)]
    if bad:
      raise train.NonFiniteLossError(
          f'non-finite {name!r} in epoch {epoch} of runs {bad}; training stopped, the state of '
          'this epoch is not saved.')


def train_runs(config: ml_collections.ConfigDict, specs: Sequence[RunSpec], workdir: str, *,
               data: Mapping[str, device_data.DeviceSplit] | None = None,
               checkpoint_every_epochs: int = 1, stop_after_epoch: int | None = None,
               run_axis: str = 'auto') -> MultiRunState:
  """Trains (resuming from `workdir`), evaluates every epoch, checkpoints, exports every run.

  Args:
    config: the shared config (see `MultiRun`); `config.num_epochs` epochs in all.
    specs: the runs.
    workdir: where the stacked state, `runs.json`, the exports and the summary go.
    data: {'train', 'validation'} `DeviceSplit`s; default: `device_data.shapes_splits` of
      `config.dataset.name` at `config.dataset.image_size`.
    checkpoint_every_epochs: K; the state is also saved after the last epoch.
    stop_after_epoch: return (saved) after this epoch although `num_epochs` is not reached,
      e.g. to split the training over several sessions; the next call resumes.
    run_axis: see `MultiRun`.

  Returns:
    The stacked state. Raises `train.NonFiniteLossError` when a loss term of some run becomes
    NaN/inf (the epoch is not saved), ValueError for configs it cannot run.
  """
  if checkpoint_every_epochs < 1:
    raise ValueError(f'checkpoint_every_epochs must be >= 1; got {checkpoint_every_epochs}')
  workdir = os.path.abspath(workdir)
  if data is None:
    setting, kwargs = device_data.generator_settings(config.dataset.name)
    data = device_data.shapes_splits(setting, image_size=config.dataset.image_size, **kwargs)
  trainer = MultiRun(config, specs, num_train_examples=len(data['train']), run_axis=run_axis)
  _check_same_runs(workdir, config, specs)
  state = trainer.init_state()
  manager = _manager(workdir)
  if manager.latest_step() is not None:
    state = restore_state(manager, state, manager.latest_step())
    logging.info('multirun: resuming %d runs at step %d from %s', len(specs), int(state.step),
                 manager.directory)
  spe = trainer.steps_per_epoch
  first_epoch = int(state.step) // spe + 1
  last_epoch = trainer.num_epochs if stop_after_epoch is None else min(trainer.num_epochs,
                                                                       stop_after_epoch)
  images_per_epoch = len(specs) * spe * trainer.batch_size
  logging.info('multirun: %d runs × %d epochs of %d steps (batch %d each), terms %s; epochs '
               '%d..%d now', len(specs), trainer.num_epochs, spe, trainer.batch_size,
               ', '.join(trainer.terms) or 'none', first_epoch, last_epoch)
  started = time.perf_counter()
  try:
    for epoch in range(first_epoch, last_epoch + 1):
      epoch_start = time.perf_counter()
      state, means = trainer.train_epoch(state, data['train'])
      means = jax.device_get(means)
      train_seconds = time.perf_counter() - epoch_start
      _check_finite(specs, epoch, means)
      top1 = trainer.evaluate(state.params, state.batch_stats, data['validation'],
                              eval_batch_size=int(config.eval_batch_size))
      state = trainer.end_epoch(state, top1, means)
      top1 = np.asarray(top1)
      done = epoch - first_epoch + 1
      eta = (time.perf_counter() - started) / done * (last_epoch - epoch)
      logging.info('multirun: epoch %d/%d: %.0f img/s (%d runs), epoch %.1f s, ETA %.0f s; '
                   'val top-1 min %.4f median %.4f max %.4f', epoch, trainer.num_epochs,
                   images_per_epoch / train_seconds, len(specs), time.perf_counter() - epoch_start,
                   eta, top1.min(), np.median(top1), top1.max())
      if epoch % checkpoint_every_epochs == 0 or epoch == last_epoch:
        save_state(manager, state)
  finally:
    manager.close()
  if int(state.step) == trainer.num_train_steps:
    export_runs(config, specs, state, workdir, steps_per_epoch=spe)
    _write_json(os.path.join(workdir, SUMMARY_FILE), summary(specs, state, spe))
  return state
