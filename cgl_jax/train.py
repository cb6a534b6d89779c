"""Data-parallel training of CGL models: one jitted step over a device mesh, clu metrics, orbax.

Objective (docs/method.md):

    L = CE + λ_bn·R_bn + λ_g·L_g + λ_s·L_s + λ_o·R_orth

The terms come unweighted from `regularize.cgl_terms`; only terms with λ > 0 are computed, and each
is logged unweighted next to the total (`train/loss`) and the cross-entropy (`train/ce`).

Weight decay: the baselines port the authors' `torch.optim.SGD(weight_decay=1e-4)`, i.e. COUPLED L2
on every model parameter (kernels, biases, BN γ/β): g ← g + wd·w before momentum
(`optax.add_decayed_weights` ahead of `optax.sgd`). With AdamW the decay is decoupled (that is what
AdamW is). With R_bn on (λ_bn > 0) the weight decay is 0 on every parameter (docs/method.md),
whatever `config.optimizer.weight_decay` says. Learned P1/P2 are never decayed.

Parallelism: a 1-D mesh `('data',)` over all devices; batches are `NamedSharding(mesh, P('data'))`,
the train state is replicated (`P()`). Under `jax.jit` every batch reduction (CE mean, BN
statistics, the per-channel std of the soft masks, metrics) is over the GLOBAL batch, so N devices
compute what one device would on the same global batch. With several processes (one per host,
`cgl_jax.distributed`) each process decodes only its rows of each global batch, and the global
batches do not depend on the topology (input_pipeline), so 1 process × N devices and N processes
× 1 device train the same model, and a checkpoint resumes under any topology.

Determinism and resume: everything random is a function of (config.seed, step): the data order
(`input_pipeline.create_split(start_step=…)`), dropout and the sampled L_g pairs
(`fold_in(train_key, step)`). Restarting the same command restores the latest finalised checkpoint
and continues to exactly the parameters an uninterrupted run reaches.

Non-finite loss: every step returns its loss terms; the host inspects them one step late (so that
checking does not stall the device) and always before a checkpoint is written, and raises
`NonFiniteLossError` naming the step and the term. The bad state is never saved.

Preemption (multi-process runs): jax.distributed turns SIGTERM (what a Cloud TPU VM gets before
it is reclaimed) into a preemption notice; all processes then stop after one agreed step, save it
and raise `PreemptedError`, and rerunning the same command continues from there.
"""
from __future__ import annotations

import collections
import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, parameter_overview, periodic_actions
from jax.sharding import NamedSharding, PartitionSpec as P

from cgl_jax import checkpoints, distributed, fileio, input_pipeline, models, regularize
from cgl_jax.config_validation import validate_config

Batch = Mapping[str, Any]


class NonFiniteLossError(FloatingPointError):
  """A train step produced a NaN/inf loss term; training stops, earlier checkpoints stay."""


class PreemptedError(RuntimeError):
  """A multi-process run got a preemption notice (SIGTERM, e.g. a spot TPU being reclaimed):
  every process stopped after the same step, whose checkpoint is saved; rerunning the same
  command resumes from it."""


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes (a pytree; replicated over the mesh).

  Attributes:
    step: number of completed train steps (int32 scalar).
    params: the model's `variables['params']`.
    batch_stats: the model's `variables['batch_stats']` ({} without batch norm).
    cgl: learned soft-mask scalars {'p1', 'p2'} when `config.cgl.learn_p`, else {} (the fixed
      values then come from the config). Optimised with the model, never weight-decayed.
    opt_state: the optax state of `{'params': params, 'cgl': cgl}`.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  cgl: Any
  opt_state: optax.OptState

  @property
  def trainable(self) -> dict[str, Any]:
    return {'params': self.params, 'cgl': self.cgl}

  def variables(self) -> dict[str, Any]:
    """What `model.apply` takes."""
    if self.batch_stats:
      return {'params': self.params, 'batch_stats': self.batch_stats}
    return {'params': self.params}


# ----------------------------------------------------------------------------------------------
# Optimisation.


def effective_weight_decay(config: ml_collections.ConfigDict) -> float:
  """config.optimizer.weight_decay, or 0 when R_bn replaces it (λ_bn > 0, docs/method.md)."""
  return 0.0 if config.cgl.lambda_bn > 0 else float(config.optimizer.weight_decay)


def create_learning_rate_schedule(optimizer_config: ml_collections.ConfigDict, *,
                                  steps_per_epoch: int, num_train_steps: int) -> optax.Schedule:
  """lr(step): optional linear warm-up from 0, then 'constant' | 'step' | 'warmup_cosine'.

  'step' multiplies the base rate by `step_factor` every `step_every_epochs` epochs (the paper's
  ×0.1 every 30 epochs); 'warmup_cosine' decays to 0 at `num_train_steps` after the warm-up.
  """
  base = optimizer_config.learning_rate
  warmup_steps = int(round(optimizer_config.warmup_epochs * steps_per_epoch))
  name = optimizer_config.schedule
  if name == 'constant':
    main = optax.constant_schedule(base)
  elif name == 'step':
    every = max(1, int(round(optimizer_config.step_every_epochs * steps_per_epoch)))
    main = optax.exponential_decay(base, transition_steps=every,
                                   decay_rate=optimizer_config.step_factor, staircase=True)
  elif name == 'warmup_cosine':
    main = optax.cosine_decay_schedule(base, decay_steps=max(1, num_train_steps - warmup_steps))
  else:
    raise ValueError(f'config.optimizer.schedule: unknown schedule {name!r}')
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, base, transition_steps=warmup_steps)
  return optax.join_schedules([warmup, main], boundaries=[warmup_steps])


def _decay_mask(trainable: Mapping[str, Any]) -> dict[str, Any]:
  """True on every model parameter, False on the learned soft-mask scalars."""
  return {'params': jax.tree.map(lambda _: True, trainable['params']),
          'cgl': jax.tree.map(lambda _: False, trainable['cgl'])}


def create_optimizer(optimizer_config: ml_collections.ConfigDict, *,
                     learning_rate: optax.Schedule,
                     weight_decay: float) -> optax.GradientTransformation:
  """SGD + momentum with coupled L2 (PyTorch semantics), or AdamW (decoupled decay)."""
  name = optimizer_config.name
  if name == 'sgd':
    sgd = optax.sgd(learning_rate, momentum=optimizer_config.momentum or None,
                    nesterov=optimizer_config.nesterov)
    if weight_decay == 0:
      return sgd
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=_decay_mask), sgd)
  if name == 'adamw':
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=_decay_mask)
  raise ValueError(f'config.optimizer.name: unknown optimizer {name!r}')


def create_train_state(model, tx: optax.GradientTransformation, *, key: jax.Array,
                       image_size: int, cgl_config: ml_collections.ConfigDict) -> TrainState:
  """Fresh state (step 0); call under `jax.jit` with replicated `out_shardings`."""
  variables = model.init({'params': key, 'dropout': key}, jnp.zeros((1, image_size, image_size, 3)),
                         train=False)
  params = variables['params']
  cgl = regularize.init_soft_mask_params(cgl_config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), cgl=cgl,
                    opt_state=tx.init({'params': params, 'cgl': cgl}))


# ----------------------------------------------------------------------------------------------
# Metrics.


@flax.struct.dataclass
class Top5Accuracy(metrics.Average):
  """Fraction of examples whose label is among the 5 largest logits (like `metrics.Accuracy`,
  from the model outputs `logits` [B, K] and int `labels` [B], optional `mask` [B])."""

  @classmethod
  def from_model_output(cls, *, logits: jax.Array, labels: jax.Array,
                        **kwargs) -> Top5Accuracy:
    top5 = jax.lax.top_k(logits, 5)[1]
    correct = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)
    return super().from_model_output(values=correct, **kwargs)


def create_metrics_collection(names: tuple[str, ...], *, num_classes: int,
                              last_values: tuple[str, ...] = ()) -> type[metrics.Collection]:
  """A clu Collection: Average of each scalar in `names`, top-1, top-5 (when K >= 5), and the
  latest value of each output in `last_values` (e.g. the learning rate)."""
  fields = {name: metrics.Average.from_output(name) for name in names}
  fields['top1'] = metrics.Accuracy
  if num_classes >= 5:
    fields['top5'] = Top5Accuracy
  for name in last_values:
    fields[name] = metrics.LastValue.from_output(name)
  return metrics.Collection.create(**fields)


# ----------------------------------------------------------------------------------------------
# Steps (pure functions; jitted in `train_and_evaluate`).


def train_step(state: TrainState, batch: Batch, train_key: jax.Array, *, model, tx,
               learning_rate: optax.Schedule, cgl_config: ml_collections.ConfigDict,
               conv_layers, metrics_cls: type[metrics.Collection],
               kernels: regularize.Kernels | None = None):
  """One SGD step on the global batch.

  Returns:
    (new_state, metrics_update, terms): `terms` maps 'loss', 'ce' and each active CGL term to
    its scalar value at this step (for the host's finiteness check).
  """
  step_key = jax.random.fold_in(train_key, state.step)
  dropout_key, pairs_key = jax.random.split(step_key)
  mutable = ['batch_stats']
  if regularize.needs_intermediates(cgl_config):
    mutable.append('intermediates')

  def loss_fn(trainable):
    variables = {'params': trainable['params']}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    logits, updates = model.apply(variables, batch['image'], train=True, mutable=mutable,
                                  rngs={'dropout': dropout_key})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    sown = models.get_intermediates(updates) if 'intermediates' in mutable else {}
    terms = regularize.cgl_terms(
        cgl_config, params=trainable['params'], intermediates=sown,
        conv_layers=conv_layers, key=pairs_key, batch_stats=state.batch_stats,
        soft_mask_params=trainable['cgl'] or None, kernels=kernels)
    loss = ce + regularize.weighted_sum(cgl_config, terms)
    return loss, (logits, {'loss': loss, 'ce': ce, **terms}, updates.get('batch_stats', {}))

  (_, (logits, terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.trainable)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  new_state = state.replace(step=state.step + 1, params=trainable['params'], cgl=trainable['cgl'],
                            batch_stats=batch_stats, opt_state=opt_state)
  # Learned P1, P2 (if any) are logged as they are after this step.
  outputs = dict(terms, **trainable['cgl'], logits=logits, labels=batch['label'],
                 learning_rate=learning_rate(state.step))
  return new_state, metrics_cls.single_from_model_output(**outputs), terms


def eval_step(state: TrainState, batch: Batch, *, model,
              metrics_cls: type[metrics.Collection]) -> metrics.Collection:
  """Metrics of one (possibly padded: `batch['mask']`) evaluation batch."""
  logits = model.apply(state.variables(), batch['image'], train=False)
  outputs = dict(logits=logits, labels=batch['label'], mask=batch['mask'],
                 ce=optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']))
  return metrics_cls.single_from_model_output(**outputs)


def make_train_step(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                    learning_rate: optax.Schedule, *, out_shardings=None):
  """`jit(train_step)` for this config: `(state, batch, train_key) -> (state, metrics, terms)`.

  The state argument is donated. `out_shardings`: e.g. the replicated `NamedSharding` of a mesh.
  """
  metrics_cls = create_metrics_collection(
      ('loss', 'ce', *regularize.active_terms(config.cgl)),
      num_classes=config.dataset.num_classes,
      last_values=('learning_rate', *regularize.init_soft_mask_params(config.cgl)))
  # Resolved only where L_g or L_s run: a baseline never builds kernels.
  kernels = (regularize.resolve_kernels(config.cgl)
             if regularize.needs_intermediates(config.cgl) else None)
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, learning_rate=learning_rate,
                        cgl_config=config.cgl, conv_layers=model.conv_layers(),
                        metrics_cls=metrics_cls, kernels=kernels),
      out_shardings=out_shardings, donate_argnums=0)


# ----------------------------------------------------------------------------------------------
# Host side.


def _check_finite(step: int, terms: Mapping[str, Any], workdir: str) -> None:
  """Raises NonFiniteLossError naming the first NaN/inf term (ce, CGL terms, then the total)."""
  fetched = jax.device_get(terms)
  order = ['ce', *(name for name in regularize.TERM_LAMBDAS if name in fetched), 'loss']
  values = {name: float(fetched[name]) for name in order}
  bad = [name for name, value in values.items() if not math.isfinite(value)]
  if not bad:
    return
  culprit = bad[0]
  summary = ', '.join(f'{name}={value:.6g}' for name, value in values.items())
  raise NonFiniteLossError(
      f'non-finite loss at train step {step}: term {culprit!r} is {values[culprit]} '
      f'({summary}). Training stopped; the state of step {step} is not saved, earlier '
      f'checkpoints in {checkpoints.checkpoint_dir(workdir)} are kept.')


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}
  def visit(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        visit(f'{name}.', value)
      else:
        flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
  visit('', config)
  return flat


def num_train_steps_and_epoch_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(total train steps, steps per epoch) for the global batch size."""
  num_examples = input_pipeline.num_examples(config.dataset, config.dataset.train_split)
  steps_per_epoch = max(1, num_examples // config.batch_size)
  if config.num_train_steps > 0:
    return int(config.num_train_steps), steps_per_epoch
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch))), steps_per_epoch


def _every(value: int, steps_per_epoch: int) -> int:
  """config *_every_steps: -1 means once per epoch."""
  return steps_per_epoch if value <= 0 else int(value)


def evaluate(state: TrainState, *, eval_step_fn, config: ml_collections.ConfigDict,
             data_sharding: NamedSharding) -> dict[str, float]:
  """Metrics over the eval split (or its first `config.steps_per_eval` batches)."""
  batches = input_pipeline.create_split(
      config.dataset, split=config.dataset.eval_split, train=False,
      batch_size=config.eval_batch_size, seed=config.seed)
  if config.steps_per_eval > 0:
    batches = itertools.islice(batches, config.steps_per_eval)
  totals = None
  # Full batches; padding rows carry mask=False and do not count.
  for batch in input_pipeline.prefetch_to_device(batches, config.prefetch_batches,
                                                 data_sharding):
    update = eval_step_fn(state, batch)
    totals = update if totals is None else totals.merge(update)
  if totals is None:
    raise ValueError(f'eval split {config.dataset.eval_split!r} of {config.dataset.name!r} '
                     'gave no batches')
  return {name: float(value) for name, value in totals.compute().items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates and checkpoints.

  Writes TensorBoard summaries and checkpoints under `workdir`; returns the final state.
  Raises `config_validation.ConfigError` before compiling anything when the config cannot work,
  `NonFiniteLossError` when a loss term becomes NaN/inf, `PreemptedError` after saving the step
  where a multi-process run stopped on a preemption notice, and
  `distributed.PeerProcessError` when another process of the run died.
  """
  workdir = fileio.as_path(workdir)  # local or remote (gs://…)
  model = models.from_config(config)
  conv_layers = model.conv_layers()
  validate_config(config, conv_layers=conv_layers, device_count=jax.device_count(),
                  process_count=jax.process_count())

  # Auto (GSPMD) axes: XLA inserts the cross-device reductions of the global-batch statistics.
  # Devices in process order: process p's rows of a global batch (input_pipeline) then land at
  # rows [p·b, (p+1)·b) of the global array, as with one process (dropout masks follow rows).
  devices = sorted(jax.devices(), key=lambda device: (device.process_index, device.id))
  mesh = jax.sharding.Mesh(np.array(devices), ('data',),
                           axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))

  num_train_steps, steps_per_epoch = num_train_steps_and_epoch_size(config)
  learning_rate = create_learning_rate_schedule(
      config.optimizer, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps)
  tx = create_optimizer(config.optimizer, learning_rate=learning_rate,
                        weight_decay=effective_weight_decay(config))
  # Made inside jit: a host-local key cannot be device_put onto devices of other processes.
  init_key, train_key = jax.jit(lambda: tuple(jax.random.split(jax.random.key(config.seed))),
                                out_shardings=replicated)()

  state = jax.jit(
      functools.partial(create_train_state, model, tx, image_size=config.dataset.image_size,
                        cgl_config=config.cgl),
      out_shardings=replicated)(key=init_key)

  train_step_fn = make_train_step(config, model, tx, learning_rate, out_shardings=replicated)
  eval_metrics_cls = create_metrics_collection(('ce',), num_classes=config.dataset.num_classes)
  eval_step_fn = jax.jit(functools.partial(eval_step, model=model, metrics_cls=eval_metrics_cls),
                         out_shardings=replicated)
  term_names = ('loss', 'ce', *regularize.active_terms(config.cgl))

  manager = checkpoints.create_manager(workdir, keep=config.keep_checkpoints,
                                       asynchronous=config.async_checkpoints)
  if manager.latest_step() is not None:
    state = checkpoints.restore(manager, state, manager.latest_step())
    logging.info('Resuming from checkpoint step %d in %s', manager.latest_step(),
                 checkpoints.checkpoint_dir(workdir))
  initial_step = int(state.step)

  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  if initial_step == 0:
    writer.write_hparams(_flat_hparams(config))
  parameter_overview.log_parameter_overview(state.params)
  logging.info('Training %s for %d steps (%d per epoch, global batch %d on %d devices); '
               'loss terms: %s; weight decay %g', config.model.name, num_train_steps,
               steps_per_epoch, config.batch_size, jax.device_count(), ', '.join(term_names),
               effective_weight_decay(config))

  train_batches = input_pipeline.prefetch_to_device(
      input_pipeline.create_split(config.dataset, split=config.dataset.train_split, train=True,
                                  batch_size=config.batch_size, seed=config.seed,
                                  start_step=initial_step),
      config.prefetch_batches, data_sharding)
  log_every = config.log_every_steps if config.log_every_steps > 0 else steps_per_epoch
  eval_every = _every(config.eval_every_steps, steps_per_epoch)
  checkpoint_every = _every(config.checkpoint_every_steps, steps_per_epoch)
  report_progress = periodic_actions.ReportProgress(num_train_steps=num_train_steps,
                                                    writer=writer, every_secs=30)

  unchecked = collections.deque()  # (step, terms) whose finiteness the host has not seen yet
  def check_unchecked(keep_last: int = 0):
    while len(unchecked) > keep_last:
      _check_finite(*unchecked.popleft(), workdir)

  train_metrics = None
  try:
    with distributed.peer_failures_raise('training'), metric_writers.ensure_flushes(writer):
      # jax's preemption sync point is the step after the last one a process asked about when the
      # notice came: ask about the restored step first, so a notice during the first step stops
      # the run after it (a notice before this line, during start-up, is not seen).
      if manager.reached_preemption(initial_step):
        raise PreemptedError(f'preempted before the first train step; the latest checkpoint '
                             f'(step {initial_step}) is unchanged; rerun the same command')
      for step in range(initial_step + 1, num_train_steps + 1):
        is_last = step == num_train_steps
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          batch = next(train_batches)
          state, metrics_update, terms = train_step_fn(state, batch, train_key)
        unchecked.append((step, terms))
        check_unchecked(keep_last=1)  # the previous step's values are ready by now
        train_metrics = (metrics_update if train_metrics is None
                         else train_metrics.merge(metrics_update))
        report_progress(step)

        if step % log_every == 0 or is_last:
          check_unchecked()
          writer.write_scalars(step, {f'train/{name}': value for name, value
                                      in train_metrics.compute().items()})
          train_metrics = None

        eval_metrics = None
        if step % eval_every == 0 or is_last:
          check_unchecked()
          with report_progress.timed('eval'):
            eval_metrics = evaluate(state, eval_step_fn=eval_step_fn, config=config,
                                    data_sharding=data_sharding)
          writer.write_scalars(step, {f'eval/{name}': value
                                      for name, value in eval_metrics.items()})

        # After a preemption notice all processes agree on a step (always False without
        # jax.distributed): save it and stop.
        preempted = manager.reached_preemption(step)
        if step % checkpoint_every == 0 or is_last or preempted:
          check_unchecked()
          with report_progress.timed('checkpoint'):
            checkpoints.save(manager, state, eval_metrics=eval_metrics)
        if preempted:
          raise PreemptedError(
              f'preempted: stopped after train step {step} of {num_train_steps} and saved it in '
              f'{checkpoints.checkpoint_dir(workdir)}; rerun the same command to resume')
      check_unchecked()
  finally:
    # A save of an earlier (good) step may still be in flight: let it finalise.
    manager.wait_until_finished()
    manager.close()
  return state
