"""Checkpoints in the workdir, and restoring a trained model WITHOUT the trainer.

Layout: `workdir/checkpoints/<step>/` written by one orbax `CheckpointManager`, each step a
composite of two items so that evaluation and dissection can read the model alone:

    'model'  {'params': …, 'batch_stats': …}   exactly the flax variables `model.apply` needs
    'train'  {'step', 'opt_state', 'cgl'}      optimiser state and learned P1/P2 (trainer only)

`<step>` counts completed train steps (the state after step N). Kept: the newest
`config.keep_checkpoints` steps plus the best one by validation top-1 (`BEST_METRIC`, stored as the
step's orbax metrics with the step itself, `STEP_METRIC`); of steps tied at the best top-1 the
EARLIEST is the best, as the authors' `if acc > best` keeps the first epoch at the maximum. Orbax writes each step into `<step>.orbax-checkpoint-tmp…` and renames it
only when every file is written, so a process killed mid-save leaves a tmp dir that
`available_steps` never lists (and the next trainer deletes); restore never sees half a step.

`save` and `restore` are the only code that knows this layout; they take the trainer's state by
its fields (`TrainStateFields`), because this module must not import the trainer (dissection
imports it).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from cgl_jax import models

CHECKPOINT_SUBDIR = 'checkpoints'
BEST_METRIC = 'eval_top1'  # orbax metrics key ranking checkpoints (higher is better)
STEP_METRIC = 'step'  # stored with it, so that ties rank the earlier step higher
MODEL_ITEM = 'model'
TRAIN_ITEM = 'train'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


class TrainStateFields(Protocol):
  """What `save` and `restore` need of a train state (e.g. `cgl_jax.train.TrainState`)."""
  step: Any  # int scalar: completed train steps
  params: Any
  batch_stats: Any
  cgl: Any
  opt_state: Any

  def replace(self, **updates: Any) -> TrainStateFields: ...


_State = TypeVar('_State', bound=TrainStateFields)


def _top1(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def _rank(metrics: dict[str, float]) -> tuple[float, float]:
  """Higher is better: top-1, then the earlier step (steps saved without it count as step 0)."""
  return metrics[BEST_METRIC], -metrics.get(STEP_METRIC, 0.0)


def create_manager(workdir: str, *, keep: int = 3, keep_best: int = 1, read_only: bool = False,
                   asynchronous: bool = True) -> ocp.CheckpointManager:
  """The one `CheckpointManager` of a workdir (the trainer writes, everyone else reads).

  Args:
    workdir: the run's directory; checkpoints go to `workdir/checkpoints`.
    keep: number of newest steps kept.
    keep_best: number of best steps by `BEST_METRIC` kept in addition (steps saved without
      metrics only count for `keep`).
    read_only: never create, write or delete anything (dissection, evaluation).
    asynchronous: write in a background thread while training goes on (orbax's default);
      False blocks until each step is committed.
  """
  if keep < 1:
    raise ValueError(f'keep_checkpoints must be >= 1, got {keep}')
  policies = ocp.checkpoint_managers
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(keep),
      policies.BestN(get_metric_fn=_rank, n=keep_best,
                     keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation,
      # best_fn also makes orbax persist each step's metrics (without it they are dropped, and
      # a restarted run would no longer know which kept step is the best).
      best_fn=_top1, best_mode='max',
      create=not read_only, read_only=read_only,
      # A killed save leaves `<step>.orbax-checkpoint-tmp*`; the next writer removes it.
      cleanup_tmp_directories=not read_only, enable_async_checkpointing=asynchronous)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _items(state: TrainStateFields) -> dict[str, dict[str, Any]]:
  """`state` split into the checkpoint's items."""
  return {MODEL_ITEM: {'params': state.params, 'batch_stats': state.batch_stats},
          TRAIN_ITEM: {'step': state.step, 'opt_state': state.opt_state, 'cgl': state.cgl}}


def save(manager: ocp.CheckpointManager, state: TrainStateFields, *,
         eval_metrics: Mapping[str, float] | None = None) -> None:
  """Writes `state` as checkpoint step `int(state.step)` (in the background if `manager` is
  asynchronous).

  Args:
    manager: from `create_manager`.
    state: the train state to save.
    eval_metrics: this step's validation metrics; their 'top1' ranks the step for `keep_best`.
      None: the step is kept only while it is among the newest.
  """
  orbax_metrics = None
  if eval_metrics is not None:
    orbax_metrics = {BEST_METRIC: float(eval_metrics['top1']), STEP_METRIC: float(state.step)}
  items = {name: ocp.args.StandardSave(item) for name, item in _items(state).items()}
  manager.save(int(state.step), metrics=orbax_metrics, args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, state_template: _State, step: int) -> _State:
  """`state_template` with every field read from checkpoint `step`.

  The template fixes the structure, shapes, dtypes and shardings of what is read (e.g. a freshly
  initialised state placed on the mesh), so the restored state is laid out exactly like it.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _items(state_template))
  restored = manager.restore(step, args=ocp.args.Composite(**{
      name: ocp.args.StandardRestore(item) for name, item in abstract.items()}))
  model_item, train_item = restored[MODEL_ITEM], restored[TRAIN_ITEM]
  return state_template.replace(
      step=train_item['step'], params=model_item['params'],
      batch_stats=model_item['batch_stats'], cgl=train_item['cgl'],
      opt_state=train_item['opt_state'])


def available_steps(workdir: str) -> list[int]:
  """Finalised checkpoint steps in `workdir`, ascending ([] when there are none)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return []
  with create_manager(workdir, read_only=True) as manager:
    return sorted(manager.all_steps())


def best_step(workdir: str) -> int | None:
  """The kept step with the highest validation top-1 (the EARLIER one on ties: the first epoch
  at the maximum, as the authors' `if acc > best`), or None when no kept step was saved with
  metrics."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with create_manager(workdir, read_only=True) as manager:
    top1 = {step: (manager.metrics(step) or {}).get(BEST_METRIC) for step in manager.all_steps()}
  scored = {step: value for step, value in top1.items() if value is not None}
  return max(scored, key=lambda step: (scored[step], -step)) if scored else None


def abstract_variables(model, image_shape: tuple[int, int, int]) -> dict[str, Any]:
  """Shapes/dtypes of `model.init` (no compute): the restore target for the 'model' item."""
  def init(rng):
    variables = model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, *image_shape)),
                           train=False)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return jax.eval_shape(init, jax.random.key(0))


def restore_model(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None):
  """Loads a trained model's variables from `workdir` (no optimiser, no trainer).

  Args:
    config: the run's config (model name/kwargs, num_classes, image size).
    workdir: the run's directory.
    step: the checkpoint step; None = the latest finalised one.

  Returns:
    (model, variables, step): `variables = {'params': …, 'batch_stats': …}` on the default
    device, ready for `model.apply(variables, images, train=False)`.

  Raises:
    FileNotFoundError: no finalised checkpoint (or not `step`) in `workdir/checkpoints`.
  """
  model = models.from_config(config)
  steps = available_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'no finalised checkpoint in {checkpoint_dir(workdir)}; '
                            'train first (python -m cgl_jax.main --config=… --workdir=…)')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f'checkpoint step {step} not in {checkpoint_dir(workdir)}; '
                            f'available steps: {steps}')
  size = config.dataset.image_size
  target = abstract_variables(model, (size, size, 3))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
  with create_manager(workdir, read_only=True) as manager:
    restored = manager.restore(
        step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(target)}))
  variables = dict(restored[MODEL_ITEM])
  if not jax.tree.leaves(variables['batch_stats']):
    variables.pop('batch_stats')
  return model, variables, step
