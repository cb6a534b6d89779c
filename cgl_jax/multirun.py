"""Several training runs at once: independent train states stacked along a run axis and stepped
together in one jitted function (`jax.vmap` over the runs, or R copies), data on the device.

    runs = multirun.grid({'baseline': dict(weight_decay=1e-4),
                          'cgl': dict(lambda_bn=1e-3, lambda_g=1e-2, lambda_s=1e-3)},
                         seeds=range(5))
    trainer = multirun.MultiRun(config, runs, num_train_examples=len(data['train']))
    state = trainer.init_state()
    state, epoch_means = trainer.train_epoch(state, data['train'])
    top1 = trainer.evaluate(state.params, state.batch_stats, data['validation'],
                            eval_batch_size=256)

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

`MultiRun` holds the jitted functions (init, step, epoch, evaluation, end of epoch);
`multirun_loop.train_runs` drives them, checkpoints, resumes and exports each run.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cgl_jax import device_augment, input_pipeline, models, regularize, train
from cgl_jax.data import device_data

AUGMENT_SALT = 0xA06  # keeps the augmentation's key apart from the other keys of a seed
HPARAMS = ('lambda_bn', 'lambda_g', 'lambda_s', 'lambda_o', 'weight_decay')
RUN_AXES = ('vmap', 'unroll')
EPOCH_LOOPS = ('scan', 'host')


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
      convolutions over R·C channels); 'unroll' writes R copies of the run's computation into
      the step (R ordinary convolutions; compiling takes about R times longer); 'auto'
      (default) is 'unroll' on the CPU, whose XLA backend has no fast grouped convolution,
      else 'vmap'. Results agree to float rounding; `experiments/bench_multirun.py` times both.
    epoch_loop: how `train_epoch` goes over an epoch's steps (and `evaluate` over batches):
      'scan' compiles the whole epoch into one `lax.scan` (no host round trip per step);
      'host' calls the jitted `train_step` once per step from Python (XLA:CPU runs
      convolutions inside a loop body without its fast library kernels, an order of magnitude
      slower); 'auto' (default) is 'host' on the CPU, else 'scan'. Either way an epoch is the
      same sequence of the same compiled computations on every call, so a resumed run repeats
      an uninterrupted one exactly.
  """

  def __init__(self, config: ml_collections.ConfigDict, specs: Sequence[RunSpec], *,
               num_train_examples: int, run_axis: str = 'auto', epoch_loop: str = 'auto'):
    _check_config(config, specs)
    if run_axis not in ('auto', *RUN_AXES):
      raise ValueError(f"run_axis must be one of {('auto', *RUN_AXES)}; got {run_axis!r}")
    if epoch_loop not in ('auto', *EPOCH_LOOPS):
      raise ValueError(f"epoch_loop must be one of {('auto', *EPOCH_LOOPS)}; got {epoch_loop!r}")
    on_cpu = jax.default_backend() == 'cpu'
    if run_axis == 'auto':
      run_axis = 'unroll' if on_cpu else 'vmap'
    if epoch_loop == 'auto':
      epoch_loop = 'host' if on_cpu else 'scan'
    self.run_axis = run_axis
    self.epoch_loop = epoch_loop
    self.config = config
    self.specs = tuple(specs)
    self.model = models.from_config(config)
    self.conv_layers = self.model.conv_layers()
    self.terms = needed_terms(specs)
    # One device steps every run, so the kernels are those of a single device.
    self.kernels = (regularize.resolve_kernels(config.cgl, num_devices=1)
                    if {'l_g', 'l_s'} & set(self.terms) else None)
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
    self.pad_value = input_pipeline.preprocess_options(config.dataset)['pad_value']
    self.mutable = ['batch_stats']
    if any(term in ('l_g', 'l_s') for term in self.terms):
      self.mutable.append('intermediates')
    self.init_run = jax.jit(self._init_run)
    self.init = jax.jit(self._init_state)
    self.train_step = jax.jit(self._train_step, donate_argnums=0)
    self._epoch_orders = jax.jit(self.epoch_orders, static_argnums=1)
    self._scanned_epoch = jax.jit(self._train_epoch, donate_argnums=0)
    self._mapped_evaluate = jax.jit(self._evaluate, static_argnames='eval_batch_size')
    self._batch_correct = jax.jit(self._batch_correct)
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

    def unrolled(*args):
      outputs = [fn(*(jax.tree.map(lambda x, r=run: x[r], arg) if axis == 0 else arg
                      for arg, axis in zip(args, in_axes)))
                 for run in range(len(self.specs))]
      return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)

    return unrolled

  # -- train ------------------------------------------------------------------------------------

  def batch(self, seed, step, order, split: device_data.DeviceSplit):
    """One run's augmented, normalised batch of `step`: (float32 [B, S, S, 3], int32 [B])."""
    rows = device_data.batch_rows(order, step % self.steps_per_epoch, self.batch_size)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), AUGMENT_SALT), step)
    images = device_augment.augment(key, split.images[rows], self.config.dataset.augment,
                                    mean=self.mean, std=self.std, fill=self.pad_value)
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
                                 batch_stats=batch_stats, terms=self.terms,
                                 kernels=self.kernels)
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

  def train_epoch(self, state: MultiRunState, split: device_data.DeviceSplit):
    """`steps_per_epoch` steps from an epoch start: (state, epoch means {name: float32 [R]}).

    `state` is donated (its buffers are reused). The means are a jax.Array ('scan') or a numpy
    array ('host').
    """
    if self.epoch_loop == 'scan':
      return self._scanned_epoch(state, split)
    orders = self._epoch_orders(state, len(split))
    terms = []
    for _ in range(self.steps_per_epoch):
      state, step_terms = self.train_step(state, split, orders)
      terms.append(step_terms)
    # Averaged on the host: a jitted mean over a list of S step results compiles per length.
    terms = jax.device_get(terms)
    return state, jax.tree.map(lambda *steps: np.mean(np.stack(steps), axis=0), *terms)

  def _train_epoch(self, state: MultiRunState, split: device_data.DeviceSplit):
    orders = self.epoch_orders(state, len(split))

    def body(carry, _):
      return self._train_step(carry, split, orders)

    state, terms = jax.lax.scan(body, state, length=self.steps_per_epoch)
    return state, jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)

  # -- evaluate ---------------------------------------------------------------------------------

  def evaluate(self, params, batch_stats, split: device_data.DeviceSplit, *,
               eval_batch_size: int) -> jax.Array:
    """float32 [R]: top-1 of every run on `split` (identity transform, batches of eval size).

    The batches go through one `lax.map` ('scan' epoch loop, a jax.Array) or one jitted call
    each ('host', a numpy array).
    """
    if self.epoch_loop == 'scan':
      return self._mapped_evaluate(params, batch_stats, split, eval_batch_size=eval_batch_size)
    num = len(split)
    correct = []
    for start in range(0, num, eval_batch_size):
      stop = start + eval_batch_size
      images, labels = split.images[start:stop], split.labels[start:stop]
      pad = eval_batch_size - len(labels)
      if pad:
        images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
        labels = jnp.pad(labels, (0, pad), constant_values=-1)
      correct.append(self._batch_correct(params, batch_stats, images, labels))
    return np.sum(jax.device_get(correct), axis=0).astype(np.float32) / np.float32(num)

  def _batch_correct(self, params, batch_stats, images, labels) -> jax.Array:
    """int [R]: every run's correct predictions on one batch (labels −1 never count)."""

    def run_correct(params, batch_stats, x, y):
      variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
      logits = self.model.apply(variables, x, train=False)
      return jnp.sum(jnp.argmax(logits, axis=-1) == y)

    x = device_augment.eval_transform(images, mean=self.mean, std=self.std)
    return self.over_runs(run_correct, in_axes=(0, 0, None, None))(params, batch_stats, x,
                                                                    labels)

  def _evaluate(self, params, batch_stats, split: device_data.DeviceSplit, *,
                eval_batch_size: int) -> jax.Array:
    num = len(split)
    batches = -(-num // eval_batch_size)
    pad = batches * eval_batch_size - num
    images = jnp.pad(split.images, ((0, pad), (0, 0), (0, 0), (0, 0)))
    labels = jnp.pad(split.labels, (0, pad), constant_values=-1)  # padding never counts
    images = images.reshape(batches, eval_batch_size, *images.shape[1:])
    labels = labels.reshape(batches, eval_batch_size)
    correct = jax.lax.map(lambda batch: self._batch_correct(params, batch_stats, *batch),
                          (images, labels))  # [batches, R]
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
  eval_crop = input_pipeline.preprocess_options(config.dataset)['eval_crop']
  if eval_crop != 'none':
    raise ValueError("multirun evaluates on the whole image: set config.dataset.eval_crop='none' "
                     f'(resolves to {eval_crop!r} here)')
