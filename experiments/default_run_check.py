r"""Do the regularizers of the README's default run act? Trains it and its baseline, compares.

    python experiments/default_run_check.py --workdir_root=/tmp/default_check \
        --output=experiments/results/default_run_check.json

Trains configs/shapes.py `cgl` (the default: `cgl,small,binary,full`) and `baseline` (same
size, labels and data) into WORKDIR_ROOT/cgl and WORKDIR_ROOT/baseline with
`train.train_and_evaluate` (a workdir that already holds the final checkpoint is resumed, i.e.
not retrained), optionally dissects the cgl run as the default command does (`--dissect`), and
writes for each run:

- validation top-1 of the final state;
- β_g = `losses.group_relevance` of the conv2 kernel (the ‖W_g‖_F of the 5 filter groups that
  R_bn sums) at initialisation and after training. The initial parameters are recomputed from
  the config's seed exactly as `train.train_and_evaluate` makes them (`create_train_state` on
  the first half of `split(key(seed))`);
- on the first `--eval_batches` validation batches, the exact-pair group distance
  `losses.group_coherence(ψ, 5, pairs='exact')` summed over the groups (the L_g term, averaged
  over batches) and `losses.spatial_concentration(ψ)` (the L_s term) of conv2's soft masks ψ,
  for the initial and final parameters. ψ uses the config's fixed (p1, p2) for both runs, so
  the two runs' values are comparable;
- wall-clock seconds of training (+ evaluation) and of the dissection, and the 1-minute load
  average before and after each, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cgl_jax import input_pipeline, losses, models, regularize, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = 'conv2'


def load_shapes_config(variant: str):
  spec = importlib.util.spec_from_file_location('shapes_config',
                                                os.path.join(REPO, 'configs', 'shapes.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def initial_state(config) -> train.TrainState:
  """The step-0 state of `train.train_and_evaluate` for `config` (same keys, same jit)."""
  model = models.from_config(config)
  num_train_steps, steps_per_epoch = train.num_train_steps_and_epoch_size(config)
  learning_rate = train.create_learning_rate_schedule(
      config.optimizer, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps)
  tx = train.create_optimizer(config.optimizer, learning_rate=learning_rate,
                              weight_decay=train.effective_weight_decay(config))
  init_key, _ = jax.jit(lambda: tuple(jax.random.split(jax.random.key(config.seed))))()
  return jax.jit(functools.partial(train.create_train_state, model, tx,
                                   image_size=config.dataset.image_size,
                                   cgl_config=config.cgl))(key=init_key)


def learning_rate_budget(config) -> dict[str, float]:
  """Σ_t lr_t and Σ_t lr_t·λ_bn/(1 − momentum): how far R_bn can move a kernel group."""
  num_train_steps, steps_per_epoch = train.num_train_steps_and_epoch_size(config)
  schedule = train.create_learning_rate_schedule(
      config.optimizer, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps)
  total = float(np.sum([schedule(step) for step in range(num_train_steps)]))
  return {'num_train_steps': num_train_steps, 'sum_lr': total,
          'r_bn_budget': total * config.cgl.lambda_bn / (1 - config.optimizer.momentum)}


def mask_diagnostics(config, state, *, eval_batches: int) -> dict[str, Any]:
  """Top-1 over the validation split and conv2's L_g (exact pairs) and L_s on its first batches."""
  model = models.from_config(config)
  layer = {layer.name: layer for layer in model.conv_layers()}[LAYER]
  groups = config.cgl.num_groups

  @jax.jit
  def batch_values(variables, images, labels, mask):
    logits, updates = model.apply(variables, images, train=False, mutable=['intermediates'])
    psi = regularize.layer_soft_masks(
        config.cgl, layer, models.get_intermediates(updates)[LAYER], params=variables['params'],
        batch_stats=variables.get('batch_stats'), p1=config.cgl.p1, p2=config.cgl.p2)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & mask)
    return (correct, jnp.sum(mask), losses.group_coherence(psi, groups, pairs='exact').sum(),
            losses.spatial_concentration(psi))

  correct = count = 0
  l_g, l_s = [], []
  batches = input_pipeline.create_split(config.dataset, split=config.dataset.eval_split,
                                        train=False, batch_size=config.eval_batch_size,
                                        seed=config.seed)
  for index, batch in enumerate(batches):
    c, n, g, s = batch_values(state.variables(), batch['image'], batch['label'], batch['mask'])
    correct, count = correct + int(c), count + int(n)
    if index < eval_batches and bool(np.all(batch['mask'])):  # full batches only: ψ's std
      l_g.append(float(g))
      l_s.append(float(s))
  return {'top1': correct / count, 'num_images': count, 'l_g_exact': float(np.mean(l_g)),
          'l_s': float(np.mean(l_s)), 'mask_batches': len(l_g)}


def group_norms(state) -> list[float]:
  kernel = state.params[LAYER]['kernel']
  return [round(float(x), 4) for x in losses.group_relevance(kernel, 5)]


def check_run(variant: str, workdir: str, *, dissect: bool, eval_batches: int,
              overrides: dict[str, float]) -> dict[str, Any]:
  config = load_shapes_config(variant)
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  init = initial_state(config)
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  final = train.train_and_evaluate(config, workdir)
  train_seconds = time.perf_counter() - start
  result = {
      'variant': variant,
      'workdir': workdir,
      'widths': list(config.model.kwargs.widths),
      'num_epochs': config.num_epochs,
      'learning_rate': config.optimizer.learning_rate,
      'lambdas': {name: config.cgl[name] for name in
                  ('lambda_bn', 'lambda_g', 'lambda_s', 'lambda_o')},
      'weight_decay': config.optimizer.weight_decay,
      **learning_rate_budget(config),
      'train_seconds': round(train_seconds, 1),
      'load_1min_before_after_train': [round(load_before, 2), round(os.getloadavg()[0], 2)],
      f'{LAYER}_group_norms_init': group_norms(init),
      f'{LAYER}_group_norms_final': group_norms(final),
  }
  if dissect:
    from cgl_jax import dissect as dissect_lib  # pylint: disable=g-import-not-at-top
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    dissect_lib.run(config, workdir)
    result['dissect_seconds'] = round(time.perf_counter() - start, 1)
    result['load_1min_before_after_dissect'] = [round(load_before, 2),
                                                round(os.getloadavg()[0], 2)]
  result['validation_init'] = mask_diagnostics(config, init, eval_batches=eval_batches)
  result['validation_final'] = mask_diagnostics(config, final, eval_batches=eval_batches)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir_root', required=True)
  parser.add_argument('--output', required=True, help='JSON file (written atomically)')
  parser.add_argument('--variants', default='cgl;baseline',
                      help="';'-separated configs/shapes.py variants; each trains into "
                           "WORKDIR_ROOT/<variant with ',' → '_'>")
  parser.add_argument('--dissect', action='store_true', help='also dissect the first variant')
  parser.add_argument('--eval_batches', type=int, default=8,
                      help='validation batches for L_g and L_s (eval_batch_size images each)')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='numeric config override for every variant, e.g. cgl.lambda_g=0.03')
  args = parser.parse_args(argv)
  overrides = {}
  for item in args.set:
    key, _, value = item.partition('=')
    if key.count('.') != 1 or not value:
      raise SystemExit(f'--set expects SECTION.NAME=NUMBER (e.g. cgl.lambda_g=0.03); got {item!r}')
    overrides[key] = float(value)
  variants = args.variants.split(';')
  runs = []
  for index, variant in enumerate(variants):
    workdir = os.path.join(args.workdir_root, variant.replace(',', '_'))
    runs.append(check_run(variant, workdir, dissect=args.dissect and index == 0,
                          eval_batches=args.eval_batches, overrides=overrides))
    print(runs[-1], flush=True)
  payload = {'jax_version': jax.__version__, 'cpu_count': os.cpu_count(),
             'backend': jax.default_backend(), 'overrides': overrides, 'runs': runs}
  results_io.write_json_atomic(args.output, payload)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
