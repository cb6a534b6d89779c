"""Several training runs at once: independent train states stacked along a run axis and stepped
together in one jitted function (`jax.vmap` or `lax.map` over the runs), data on the device.

    runs = multirun.grid({'baseline': dict(weight_decay=1e-4),
                          'cgl': dict(lambda_bn=1e-3, lambda_g=1e-2, lambda_s=1e-3)},
                         seeds=range(5))
    state = multirun.train_runs(config, runs, workdir)
    model, variables, step = checkpoints.restore_model(multirun.run_config(config, runs[0]),
                                                       multirun.run_dir(workdir, runs[0]))

R runs (e.g. seeds × regulariser rows) share the model, the data, the optimiser recipe and the
schedule of `config`; each has its own seed and its own λ_bn, λ_g, λ_s, λ_o and weight decay
(`RunSpec`). These are ARRAYS in the stacked state, so all rows share one compile and one pass
over the data.

Per run and step (the objective of `train.train_step`, single device, SGD only):

    L = CE + Σ_{t ∈ needed} λ_t · t                (t from `regularize.cgl_terms`)
    g ← ∇L + wd · w                                 (coupled L2 on every model parameter)
    momentum SGD on g with `config.optimizer`'s schedule (`train.create_learning_rate_schedule`)

"needed" is every term some run weighs with λ > 0; a run with λ_t = 0 adds 0·t, which leaves
its gradient unchanged. The weight decay is the trainer's `add_decayed_weights` ahead of
`optax.sgd` with a per-run rate (equal to it for a fixed rate); `train.effective_weight_decay`
gives a config's rate (0 when R_bn replaces it).

Randomness, from (seed, step) only: parameters from `split(key(seed))[0]` and the L_g pairs
from `split(fold_in(split(key(seed))[1], step))[1]`, as the trainer draws them; the data order
from `device_data.epoch_order`; the augmentation from `fold_in(fold_in(key(seed), AUGMENT_SALT),
step)` (`device_augment`). Runs with equal seeds see the same batches.

Every epoch ends with the validation top-1 of every run on the device; each run keeps its
latest parameters and those of its best epoch (the first epoch at the maximum). Every
`checkpoint_every_epochs` epochs the stacked state goes to `workdir/multirun/<step>` (orbax);
the same command restarted resumes bit-exactly. At the end every run is exported to
`workdir/runs/<name>/` in the layout of `checkpoints` (items 'model' of its best and latest
steps, the best also ranked best by `checkpoints.best_step` unless a later step ties it) with
its single-run config in `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from cgl_jax import checkpoints, device_augment, input_pipeline, models, regularize, train
from cgl_jax.data import device_data

AUGMENT_SALT = 0xA06  # keeps the augmentation's key apart from the other keys of a seed
HPARAMS = ('lambda_bn', 'lambda_g', 'lambda_s', 'lambda_o', 'weight_decay')
STATE_SUBDIR = 'multirun'
RUNS_SUBDIR = 'runs'
RUNS_FILE = 'runs.json'
SUMMARY_FILE = 'multirun_summary.json'
RUN_AXES = ('vmap', 'map')


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run: its name (a directory name), seed and the hyperparameters that differ per run."""
  name: str
  seed: int
  lambda_bn: float = 0.0
  lambda_g: float = 0.0
  lambda_s: float = 0.0
  lambda_o: float = 0.0
  weight_decay: float = 0.0

  def __post_init__(self):
    if not self.name or os.sep in self.name or self.name.startswith('.'):
      raise ValueError(f'RunSpec.name must be a plain directory name; got {self.name!r}')
    if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**31:
      raise ValueError(f'RunSpec {self.name!r}: seed must be an integer in [0, 2^31); '
                       f'got {self.seed!r}')
    for name in HPARAMS:
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f'RunSpec {self.name!r}: {name} must be a finite number >= 0; '
                         f'got {value!r}')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, name: str) -> RunSpec:
    """The run a single-run config describes (its seed, λ and effective weight decay)."""
    return cls(name=name, seed=int(config.seed),
               **{key: float(config.cgl[key]) for key in HPARAMS if key != 'weight_decay'},
               weight_decay=train.effective_weight_decay(config))


def grid(rows: Mapping[str, Mapping[str, float]], seeds: Iterable[int]) -> list[RunSpec]:
  """Rows × seeds, named '<row>_seed<seed>', row-major. rows: name → {hparam: value}."""
  specs = []
  for row, hparams in rows.items():
    unknown = sorted(set(hparams) - set(HPARAMS))
    if unknown:
      raise ValueError(f'row {row!r}: unknown hyperparameters {unknown}; known: {HPARAMS}')
    specs.extend(RunSpec(name=f'{row}_seed{seed}', seed=int(seed), **hparams) for seed in seeds)
  return specs


def run_config(config: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
  """The single-run config of `spec`: `config` with its seed, λ and optimizer.weight_decay."""
  single = ml_collections.ConfigDict(config.to_dict())
  single.seed = spec.seed
  for key in HPARAMS[:-1]:
    single.cgl[key] = getattr(spec, key)
  single.optimizer.weight_decay = spec.weight_decay
  return single


def run_dir(workdir: str, spec: RunSpec) -> str:
  """The exported run's workdir (`checkpoints.restore_model` reads it)."""
  return os.path.join(os.path.abspath(workdir), RUNS_SUBDIR, spec.name)


def needed_terms(specs: Sequence[RunSpec]) -> tuple[str, ...]:
  """The CGL terms some run weighs with λ > 0, in `regularize.TERM_LAMBDAS` order."""
  return tuple(term for term, key in regularize.TERM_LAMBDAS.items()
               if any(getattr(spec, key) > 0 for spec in specs))


# ----------------------------------------------------------------------------------------------
# State.


@flax.struct.dataclass
class MultiRunState:
  """The stacked state of R runs; every leaf but `step` has a leading axis R.

  Attributes:
    step: completed train steps (int32 scalar, the same for every run).
    hparams: {'seed': int32 [R], 'lambda_bn' … 'weight_decay': float32 [R]}.
    params, batch_stats, opt_state: the latest train state of each run.
    best: {'params', 'batch_stats'} of each run's best epoch so far.
    best_top1: float32 [R], its validation top-1 (−1 before the first evaluation).
    best_epoch: int32 [R], the number of epochs completed at the best one (0 = none yet).
    history: {'val_top1', 'loss', 'ce', <needed terms>}: float32 [R, num_epochs], per epoch
      (train values are epoch means), NaN for epochs not yet run.
  """
  step: jax.Array
  hparams: dict[str, jax.Array]
  params: Any
  batch_stats: Any
  opt_state: Any
  best: dict[str, Any]
  best_top1: jax.Array
  best_epoch: jax.Array
  history: dict[str, jax.Array]

  @property
  def num_runs(self) -> int:
    return int(self.best_top1.shape[0])


def _stack_hparams(specs: Sequence[RunSpec]) -> dict[str, np.ndarray]:
  hparams = {key: np.asarray([getattr(spec, key) for spec in specs], np.float32)
             for key in HPARAMS}
  hparams['seed'] = np.asarray([spec.seed for spec in specs], np.int32)
  return hparams


# ----------------------------------------------------------------------------------------------
# The trainer of R runs (pure functions of the setup, jitted once).


class MultiRun:
  """Jitted init / train / evaluate functions of R runs of one config.

  Args:
    config: the shared config (model, dataset.image_size/augment/mean/std, batch_size,
      eval_batch_size, num_epochs, optimizer, cgl layers/groups/pairs/…); its seed and λ are
      ignored (they come from `specs`).
    specs: the runs.
    num_train_examples: the train split's size (for the epoch length).
    run_axis: how the model's computation goes over the runs inside the jitted step:
      'vmap' batches the R runs into one computation (the convolutions become grouped
      convolutions over R·C channels); 'map' loops over them (`lax.map`: R ordinary
      convolutions one after another, one compile); 'auto' (default) is 'map' on the CPU,
      whose XLA backend has no fast grouped convolution, else 'vmap'. Results agree to float
      rounding; `experiments/bench_multirun.py` times both.
  """

  def __init__(self, config: ml_collections.ConfigDict, specs: Sequence[RunSpec], *,
               num_train_examples: int, run_axis: str = 'auto'):
    _check_config(config, specs)
    if run_axis not in ('auto', *RUN_AXES):
      raise ValueError(f"run_axis must be one of {('auto', *RUN_AXES)}; got {run_axis!r}")
    if run_axis == 'auto':
      run_axis = 'map' if jax.default_backend() == 'cpu' else 'vmap'
    self.run_axis = run_axis
    self.config = config
    self.specs = tuple(specs)
    self.model = models.from_config(config)
    self.conv_layers = self.model.conv_layers()
    self.terms = needed_terms(specs)
    self.batch_size = int(config.batch_size)
    self.steps_per_epoch = device_data.steps_per_epoch(num_train_examples, self.batch_size)
    self.num_epochs = int(config.num_epochs)
    self.num_train_steps = self.num_epochs * self.steps_per_epoch
    self.learning_rate = train.create_learning_rate_schedule(
        config.optimizer, steps_per_epoch=self.steps_per_epoch,
        num_train_steps=self.num_train_steps)
    # Weight decay is added per run in `_run_step` (its rate is an array).
    self.tx = train.create_optimizer(config.optimizer, learning_rate=self.learning_rate,
                                     weight_decay=0.0)
    self.mean, self.std = input_pipeline.normalization(config.dataset)
    self.mutable = ['batch_stats']
    if any(term in ('l_g', 'l_s') for term in self.terms):
      self.mutable.append('intermediates')
    self.init_run = jax.jit(self._init_run)
    self.init = jax.jit(self._init_state)
    self.train_step = jax.jit(self._train_step, donate_argnums=0)
    self.train_epoch = jax.jit(self._train_epoch, donate_argnums=0)
    self.evaluate = jax.jit(self._evaluate, static_argnames='eval_batch_size')
    self.end_epoch = jax.jit(self._end_epoch, donate_argnums=0)

  @property
  def image_size(self) -> int:
    return int(self.config.dataset.image_size)

  # -- init -------------------------------------------------------------------------------------

  def _init_run(self, seed):
    init_key, _ = jax.random.split(jax.random.key(seed))
    size = self.image_size
    variables = self.model.init({'params': init_key, 'dropout': init_key},
                                jnp.zeros((1, size, size, 3)), train=False)
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    return params, batch_stats, self.tx.init(params)

  def _init_state(self, hparams: Mapping[str, jax.Array], params, batch_stats,
                  opt_state) -> MultiRunState:
    runs = hparams['seed'].shape[0]
    nan = jnp.full((runs, self.num_epochs), jnp.nan, jnp.float32)
    return MultiRunState(
        step=jnp.zeros((), jnp.int32), hparams=dict(hparams), params=params,
        batch_stats=batch_stats, opt_state=opt_state,
        best={'params': params, 'batch_stats': batch_stats},
        best_top1=jnp.full((runs,), -1.0, jnp.float32), best_epoch=jnp.zeros((runs,), jnp.int32),
        history={name: nan for name in ('val_top1', 'loss', 'ce', *self.terms)})

  def init_state(self, device: jax.Device | None = None) -> MultiRunState:
    """Step 0 of every run, on `device` (default: the first local device).

    Each run is initialised on its own (not under vmap), so its parameters are bit-equal to
    those of the single-run trainer with the same seed.
    """
    hparams = _stack_hparams(self.specs)
    runs = [self.init_run(seed) for seed in hparams['seed']]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *runs)
    state = self.init(hparams, *stacked)
    # Committed to the device like every later state, so that the steps compile once.
    return jax.device_put(state, device or jax.local_devices()[0])

  def over_runs(self, fn, in_axes: Sequence[int | None]):
    """`fn` applied to every run: in_axes 0 = stacked over runs, None = shared (`run_axis`)."""
    if self.run_axis == 'vmap':
      return jax.vmap(fn, in_axes=tuple(in_axes))

    def mapped(*args):
      stacked = tuple(arg for arg, axis in zip(args, in_axes) if axis == 0)

      def one(per_run):
        per_run = iter(per_run)
        return fn(*(next(per_run) if axis == 0 else arg for arg, axis in zip(args, in_axes)))

      return jax.lax.map(one, stacked)

    return mapped

  # -- train ------------------------------------------------------------------------------------

  def batch(self, seed, step, order, split: device_data.DeviceSplit):
    """One run's augmented, normalised batch of `step`: (float32 [B, S, S, 3], int32 [B])."""
    rows = device_data.batch_rows(order, step % self.steps_per_epoch, self.batch_size)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), AUGMENT_SALT), step)
    images = device_augment.augment(key, split.images[rows], self.config.dataset.augment,
                                    mean=self.mean, std=self.std)
    return images, split.labels[rows]

  def loss_terms(self, params, batch_stats, hparams, images, labels, pairs_key, dropout_key):
    """(loss, (terms, new batch_stats)) of one run: terms = {'loss', 'ce', <needed terms>}."""
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    logits, updates = self.model.apply(variables, images, train=True, mutable=self.mutable,
                                       rngs={'dropout': dropout_key})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    sown = models.get_intermediates(updates) if 'intermediates' in self.mutable else {}
    terms = regularize.cgl_terms(self.config.cgl, params=params, intermediates=sown,
                                 conv_layers=self.conv_layers, key=pairs_key,
                                 batch_stats=batch_stats, terms=self.terms)
    weighted = jnp.zeros((), jnp.float32)
    for name, value in terms.items():
      weighted = weighted + hparams[regularize.TERM_LAMBDAS[name]] * value
    loss = ce + weighted
    return loss, ({'loss': loss, 'ce': ce, **terms}, updates.get('batch_stats', {}))

  def _run_step(self, params, batch_stats, opt_state, hparams, order, split, step):
    seed = hparams['seed']
    images, labels = self.batch(seed, step, order, split)
    _, train_key = jax.random.split(jax.random.key(seed))
    dropout_key, pairs_key = jax.random.split(jax.random.fold_in(train_key, step))
    grad_fn = jax.grad(self.loss_terms, has_aux=True)
    grads, (terms, batch_stats) = grad_fn(params, batch_stats, hparams, images, labels,
                                          pairs_key, dropout_key)
    # Coupled L2 (optax.add_decayed_weights ahead of optax.sgd, with this run's rate).
    grads = jax.tree.map(lambda g, w: g + hparams['weight_decay'] * w, grads, params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, terms

  def epoch_orders(self, state: MultiRunState, num_examples: int) -> jax.Array:
    """int32 [R, N]: every run's data order of the epoch of `state.step`."""
    epoch = state.step // self.steps_per_epoch
    return jax.vmap(device_data.epoch_order, (0, None, None))(
        state.hparams['seed'], epoch, num_examples)

  def _train_step(self, state: MultiRunState, split: device_data.DeviceSplit,
                  orders: jax.Array) -> tuple[MultiRunState, dict[str, jax.Array]]:
    """One step of every run: (state, {'loss', 'ce', <terms>}: float32 [R])."""
    params, batch_stats, opt_state, terms = self.over_runs(
        self._run_step, in_axes=(0, 0, 0, 0, 0, None, None))(
            state.params, state.batch_stats, state.opt_state, state.hparams, orders, split,
            state.step)
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), terms

  def _train_epoch(self, state: MultiRunState, split: device_data.DeviceSplit):
    """`steps_per_epoch` steps from an epoch start: (state, epoch means {name: float32 [R]})."""
    orders = self.epoch_orders(state, len(split))

    def body(carry, _):
      return self._train_step(carry, split, orders)

    state, terms = jax.lax.scan(body, state, length=self.steps_per_epoch)
    return state, jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)

  # -- evaluate ---------------------------------------------------------------------------------

  def _evaluate(self, params, batch_stats, split: device_data.DeviceSplit, *,
                eval_batch_size: int) -> jax.Array:
    """float32 [R]: top-1 of every run on `split` (identity transform, batches of eval size)."""
    num = len(split)
    batches = -(-num // eval_batch_size)
    pad = batches * eval_batch_size - num
    images = jnp.pad(split.images, ((0, pad), (0, 0), (0, 0), (0, 0)))
    labels = jnp.pad(split.labels, (0, pad), constant_values=-1)  # padding never counts
    images = images.reshape(batches, eval_batch_size, *images.shape[1:])
    labels = labels.reshape(batches, eval_batch_size)

    def run_correct(params, batch_stats, x, y):
      variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
      logits = self.model.apply(variables, x, train=False)
      return jnp.sum(jnp.argmax(logits, axis=-1) == y)

    def batch_correct(batch):
      x = device_augment.eval_transform(batch[0], mean=self.mean, std=self.std)
      return self.over_runs(run_correct, in_axes=(0, 0, None, None))(params, batch_stats, x,
                                                                      batch[1])

    correct = jax.lax.map(batch_correct, (images, labels))  # [batches, R]
    return jnp.sum(correct, axis=0).astype(jnp.float32) / num

  def _end_epoch(self, state: MultiRunState, top1: jax.Array,
                 train_means: Mapping[str, jax.Array]) -> MultiRunState:
    """Records the epoch in `history`; a strictly better top-1 replaces `best`."""
    epoch = state.step // self.steps_per_epoch  # epochs completed
    better = top1 > state.best_top1
    pick = lambda new, old: jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    best = jax.tree.map(pick, {'params': state.params, 'batch_stats': state.batch_stats},
                        state.best)
    values = dict(train_means, val_top1=top1)
    history = {name: series.at[:, epoch - 1].set(values[name])
               for name, series in state.history.items()}
    return state.replace(best=best, best_top1=jnp.where(better, top1, state.best_top1),
                         best_epoch=jnp.where(better, epoch, state.best_epoch), history=history)


def _check_config(config: ml_collections.ConfigDict, specs: Sequence[RunSpec]) -> None:
  if not specs:
    raise ValueError('multirun needs at least one RunSpec')
  names = [spec.name for spec in specs]
  if len(set(names)) != len(names):
    raise ValueError(f'RunSpec names must be unique; got {names}')
  if config.optimizer.name != 'sgd':
    raise ValueError(f"multirun supports config.optimizer.name='sgd' only (coupled L2 per run); "
                     f'got {config.optimizer.name!r}')
  if config.cgl.learn_p:
    raise ValueError('multirun does not support config.cgl.learn_p=True (fixed P1, P2 only)')
  if config.num_train_steps > 0:
    raise ValueError('multirun counts whole epochs: set config.num_epochs and leave '
                     f'config.num_train_steps at -1 (got {config.num_train_steps})')
  epochs = config.num_epochs
  if epochs != int(epochs) or epochs < 1:
    raise ValueError(f'config.num_epochs must be a whole number >= 1 for multirun; got {epochs}')
  device_augment.check_kind(config.dataset.augment)


# ----------------------------------------------------------------------------------------------
# Host side: checkpoints, export, the loop.


def _manager(workdir: str) -> ocp.CheckpointManager:
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
