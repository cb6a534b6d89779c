r"""The paper's synthetic experiment (Table 1): does CGL make conv filters detect more concepts?

    python experiments/table1.py                       # the full experiment (one GPU)
    python experiments/table1.py --stage=sweep         # one stage (each resumes where it stopped)
    python experiments/table1.py --cpu                 # the shrunken version for 2 CPU cores

Binary shapes data, the authors' recipe (`configs/shapes.py` `paper`: ShapesCNN 128/256 with
PyTorch's initialisation, 64-px images, random-resized crop + flip, SGD 0.01 momentum 0.9, batch
32, ×0.1 every 30 epochs, the best-validation epoch dissected). Three regularizer rows: weight
decay 1e-4 (`baseline`), R_bn (`rbn`), R_bn + L_g + L_s (`cgl`). All runs of a stage train
together (`cgl_jax.multirun`, data and augmentation on the device) and are dissected together
(`cgl_jax.dissect.multirun`) twice: NetDissect-Lite's measurement (`netdissect_lite`, bilinear
upsampling, validation images, IoU ≥ 0.04) and the authors' (`authors_synthetic`: nearest
upsampling, every image as JPEG, IoU ≥ 0.08 first). Stages:

  sweep   on a tuning seed (--sweep-seed, never a reported seed): weight decay, and CGL over the
          grid λ_bn × λ_g × λ_s (--lambda-bn/-g/-s) plus the authors' run (λ_bn 0.01, λ_g 0.001,
          λ_s 0, orthogonality λ_o 0.001). Chosen: the CGL candidate with the most conv2 unique
          detectors (ours, IoU ≥ 0.04) among those within 1 point of the weight-decay run's
          validation top-1 (all, if none is); ties go to the more accurate. R_bn takes its λ_bn.
  main    the three rows × --seeds, --epochs epochs.
  long    one run per row of --long-epochs epochs (the authors' 90), the first of --seeds.
  classes45  the weight-decay row on the 45-class labels × --classes45-seeds, --epochs epochs
          (the paper: it recovers every concept; the faithfulness check of the measurement).
  ablation  CGL at fixed λ (--ablation-lambdas λ_bn λ_g λ_s) × --seeds, --epochs epochs, compared
          with the main stage's weight-decay runs of the same seeds: is the answer a property of
          the λ the sweep chose? Skipped when --ablation-lambdas is not given (or is `none`).
  report  RESULTS.md (--results) and figures (--figures) from the stages' records.

A finished stage (its `<root>/<stage>.json` exists) is skipped; an interrupted one resumes from
its multirun checkpoint (`<root>/<stage>/…`) and its cached dissections. `--cpu` shrinks every
size (flags given explicitly still win); see `CPU_DEFAULTS`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_atomic  # pylint: disable=g-import-not-at-top
from table1_report import ABLATION_ROW  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ('baseline', 'rbn', 'cgl')
STAGES = ('sweep', 'main', 'long', 'classes45', 'ablation', 'report')
MEASUREMENTS = ('netdissect_lite', 'authors_synthetic')
LAYERS = ('conv1', 'conv2')
BASELINE = dict(weight_decay=1e-4)  # the authors' weight-decay baseline
AUTHORS_RUN = dict(lambda_bn=1e-2, lambda_g=1e-3, lambda_s=0.0, lambda_o=1e-3)
# The full experiment; `--cpu` replaces these (unless a flag is given).
DEFAULTS = dict(widths=[128, 256], image_size=64, augment='random_resized_crop', batch_size=32,
                learning_rate=0.01, schedule='step', initializer='pytorch', epochs=30,
                long_epochs=90, seeds=[0, 1, 2, 3, 4], sweep_seed=100, lambda_bn=[1e-3, 1e-2],
                lambda_g=[1e-3, 1e-2], lambda_s=[1e-3, 1e-2, 0.1], authors_run=True,
                images_per_class=640, diagnostic_images=2048, classes45_seeds=[0, 1, 2, 3, 4],
                ablation_lambdas=None)
# 2 shared CPU cores: the README's default run (configs/shapes.py `small`: ShapesCNN 16/32 with
# He-normal initialisation on 32-px images, pad-crop + flip, batch 64, SGD lr 0.04 with warm-up
# and cosine decay, 6 epochs of the full data), whose regularizers are known to move the
# weights. λ_bn ∈ {5e-3, 1e-2} puts the R_bn budget Σ_t lr_t·λ_bn/(1 − momentum) at 2.2–4.4,
# inside the authors' 90-epoch range (≈ 2.4–24); λ_g, λ_s around the default run's. 6 seeds
# (the fewest with which the sign-flip test can reach p < 0.05), long runs of 12 epochs, three
# 45-class seeds, and the default run's own λ as the ablation.
CPU_DEFAULTS = dict(widths=[16, 32], image_size=32, augment='pad_crop', batch_size=64,
                    learning_rate=0.04, schedule='warmup_cosine', initializer='he_normal',
                    epochs=6, long_epochs=12, seeds=[0, 1, 2, 3, 4, 5], sweep_seed=100,
                    lambda_bn=[5e-3, 1e-2], lambda_g=[1e-2, 3e-2], lambda_s=[1e-2, 1e-1],
                    authors_run=True, images_per_class=640, diagnostic_images=512,
                    classes45_seeds=[0, 1, 2], ablation_lambdas=[5e-3, 3e-2, 1e-2])


# ------------------------------------------------------------------------------------------------
# Configs and data.


def stage_config(args, *, labels: str, epochs: int):
  """The shared multirun config of a stage (configs/shapes.py `paper`, resized by `args`)."""
  from cgl_jax import default_config  # pylint: disable=g-import-not-at-top
  config = default_config.load_config_file(
      os.path.join(REPO, 'configs', f'shapes.py:cgl,paper,{labels}'))
  config.model.kwargs.widths = tuple(args.widths)
  config.model.kwargs.initializer = args.initializer
  config.optimizer.schedule = args.schedule
  config.dataset.image_size = args.image_size
  config.dataset.augment = args.augment
  config.batch_size = args.batch_size
  config.optimizer.learning_rate = args.learning_rate
  config.num_epochs = epochs
  return config


_DATA: dict[str, Any] = {}


def splits(args, labels: str):
  """{'train', 'validation'} `DeviceSplit`s of the shapes data (cached per label setting)."""
  from cgl_jax.data import device_data  # pylint: disable=g-import-not-at-top
  if labels not in _DATA:
    _DATA[labels] = device_data.shapes_splits(labels, image_size=args.image_size,
                                              images_per_class=args.images_per_class)
  return _DATA[labels]


def probe_set(args, measurement: str):
  """The measurement's Broden probe set of the shapes images (exported once under --root)."""
  from cgl_jax.data import broden, shapes  # pylint: disable=g-import-not-at-top
  from cgl_jax.dissect import measurement as measurement_lib  # pylint: disable=g-import-not-at-top
  chosen = measurement_lib.resolve({'measurement': measurement})
  directory = os.path.join(args.root, 'broden', f'{chosen["probe_split"]}_'
                           f'{chosen["image_format"]}_{args.images_per_class}')
  if not os.path.isdir(directory):
    try:
      shapes.export_broden(directory, split=chosen['probe_split'],
                           image_format=chosen['image_format'],
                           images_per_class=args.images_per_class)
    except FileExistsError:  # exported meanwhile by another process (the write is atomic)
      pass
  return broden.Broden(directory)


def rbn_budget(trainer, lambda_bn: float, momentum: float) -> float:
  """Σ_t lr_t · λ_bn / (1 − momentum): how far R_bn can shrink the group norms in all."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  steps = jnp.arange(trainer.num_train_steps)
  return float(jnp.sum(trainer.learning_rate(steps))) * lambda_bn / (1 - momentum)


# ------------------------------------------------------------------------------------------------
# One stage: train R runs together, dissect them together both ways, diagnose each.


def row_of(name: str) -> str:
  return name.rsplit('_seed', 1)[0]


def dissect_runs(args, config, trainer, specs, variables, workdir: str, *,
                 reports: tuple[str, ...]) -> dict[str, dict[str, Any]]:
  """{measurement: {run: {'layers': {layer: detectors}, 'units': diagnostics}}}, cached."""
  from cgl_jax import dissect, diagnostics  # pylint: disable=g-import-not-at-top
  from cgl_jax.dissect import multirun as dissect_multirun  # pylint: disable=g-import-not-at-top
  out = {}
  for measurement in MEASUREMENTS:
    path = os.path.join(workdir, f'dissect_{measurement}.json')
    if os.path.exists(path):
      with open(path) as f:
        out[measurement] = json.load(f)
      continue
    config.dissect.measurement = measurement
    settings = dissect.DissectionSettings.from_config(config)
    data = probe_set(args, measurement)
    started = time.perf_counter()
    results = dissect_multirun.compute_runs(trainer.model, variables, data, settings,
                                            run_axis=trainer.run_axis, show_progress=False)
    print(f'  dissected {len(specs)} runs ({measurement}, {len(data)} images) in '
          f'{time.perf_counter() - started:.0f} s', flush=True)
    colour = data.categories.index('color')
    objects = diagnostics.category_labels(data.primary_category_index(), colour)
    records = {}
    for spec, result in zip(specs, results):
      records[spec.name] = {
          'layers': {name: layer.detectors for name, layer in result.layers.items()},
          'units': diagnostics.dissection_units(result, objects)}
      if measurement == MEASUREMENTS[0] and spec.name in reports:
        records[spec.name]['report'] = dissect.write_report(
            result, os.path.join(workdir, 'reports', spec.name), step=0, data=data)
    write_json_atomic(path, records, indent=1)
    out[measurement] = records
  return out


def diagnose_runs(args, config, trainer, specs, variables) -> dict[str, dict[str, Any]]:
  """Per run: mask statistics on validation images, group norms against init and baseline."""
  import jax  # pylint: disable=g-import-not-at-top
  from cgl_jax import device_augment, diagnostics  # pylint: disable=g-import-not-at-top
  validation = splits(args, config.dataset.name.split('/')[-1])['validation']
  count = min(args.diagnostic_images, len(validation))
  batch = min(64, count)
  images = np.asarray(device_augment.eval_transform(validation.images[:count], mean=trainer.mean,
                                                    std=trainer.std))
  groups = int(config.cgl.num_groups)
  norms, out = {}, {}
  for index, spec in enumerate(specs):
    run = jax.tree.map(lambda leaf: leaf[index], variables)
    init_params = trainer.init_run(spec.seed)[0]
    norms[spec.name] = diagnostics.group_norms(run['params'], trainer.conv_layers, groups)
    init = diagnostics.group_norms(init_params, trainer.conv_layers, groups)
    out[spec.name] = dict(
        diagnostics.mask_statistics(trainer.model, run, images, config.cgl, batch_size=batch),
        group_norms={k: v.tolist() for k, v in norms[spec.name].items()},
        init_group_norms={k: v.tolist() for k, v in init.items()},
        change_vs_init={k: diagnostics.relative_change(norms[spec.name][k], init[k])
                        for k in init},
        rbn_budget=rbn_budget(trainer, spec.lambda_bn, config.optimizer.momentum))
  for spec in specs:  # against the weight-decay run of the same seed (same init, same batches)
    paired = f'baseline_seed{spec.seed}'
    if paired in norms and paired != spec.name:
      out[spec.name]['change_vs_baseline'] = {
          k: diagnostics.relative_change(v, norms[paired][k]) for k, v in norms[spec.name].items()}
  return out


def run_stage(args, stage: str, rows: dict[str, dict], seeds, *, labels: str, epochs: int,
              reports: tuple[str, ...] = ()) -> list[dict[str, Any]]:
  """Trains (resuming), dissects and diagnoses rows × seeds in `<root>/<stage>`; run records."""
  import jax  # pylint: disable=g-import-not-at-top
  from cgl_jax import multirun, multirun_loop  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.root, stage)
  config = stage_config(args, labels=labels, epochs=epochs)
  specs = multirun.grid(rows, seeds)
  data = splits(args, labels)
  print(f'== {stage}: {len(specs)} runs × {epochs} epochs ({labels}) ==', flush=True)
  started = time.perf_counter()
  state = multirun_loop.train_runs(config, specs, workdir, data=data, run_axis=args.run_axis)
  trained = time.perf_counter() - started
  trainer = multirun.MultiRun(config, specs, num_train_examples=len(data['train']),
                              run_axis=args.run_axis)
  source = state.best if config.dissect.checkpoint == 'best' else {
      'params': state.params, 'batch_stats': state.batch_stats}
  variables = {'params': source['params']}
  if jax.tree.leaves(source['batch_stats']):
    variables['batch_stats'] = source['batch_stats']
  dissections = dissect_runs(args, config, trainer, specs, variables, workdir, reports=reports)
  diagnosis = diagnose_runs(args, config, trainer, specs, variables)
  summary = multirun_loop.summary(specs, state, trainer.steps_per_epoch)['runs']
  records = []
  for spec in specs:
    history = summary[spec.name]['history']
    records.append(dict(
        name=spec.name, row=row_of(spec.name), seed=spec.seed, labels=labels, epochs=epochs,
        hparams={k: getattr(spec, k) for k in multirun.HPARAMS},
        best_val_top1=summary[spec.name]['best_val_top1'],
        best_epoch=summary[spec.name]['best_epoch'], final_val_top1=history['val_top1'][-1],
        final_train_ce=history['ce'][-1],
        dissection={m: dissections[m][spec.name] for m in MEASUREMENTS},
        diagnostics=diagnosis[spec.name]))
  print(f'   {stage}: trained in {trained:.0f} s, all done in '
        f'{time.perf_counter() - started:.0f} s', flush=True)
  return records


# ------------------------------------------------------------------------------------------------
# Stages.


def conv2_unique(record: dict, measurement: str = MEASUREMENTS[0], threshold: float = 0.04):
  detectors = record['dissection'][measurement]['layers']['conv2']
  return next(d['unique_detectors'] for d in detectors if d['iou_threshold'] == threshold)


def candidate_name(hparams: dict) -> str:
  parts = [f'{key.split("_")[1]}{hparams[key]:g}' for key in ('lambda_bn', 'lambda_g',
                                                               'lambda_s', 'lambda_o')
           if hparams.get(key)]
  return 'cgl-' + '-'.join(parts)


def sweep_candidates(args) -> dict[str, dict]:
  candidates = {}
  for bn, g, s in itertools.product(args.lambda_bn, args.lambda_g, args.lambda_s):
    hparams = dict(lambda_bn=bn, lambda_g=g, lambda_s=s)
    candidates[candidate_name(hparams)] = hparams
  if args.authors_run:
    candidates[candidate_name(AUTHORS_RUN)] = dict(AUTHORS_RUN)
  return candidates


def choose(records: list[dict]) -> tuple[dict, float]:
  """The sweep rule (module docstring): (chosen record, accuracy floor)."""
  baseline = next(r for r in records if r['row'] == 'baseline')
  floor = baseline['best_val_top1'] - 0.01
  candidates = [r for r in records if r['row'] != 'baseline']
  eligible = [r for r in candidates if r['best_val_top1'] >= floor] or candidates
  return max(eligible, key=lambda r: (conv2_unique(r), r['best_val_top1'])), floor


def stage_path(args, stage: str) -> str:
  return os.path.join(args.root, f'{stage}.json')


def load_stage(args, stage: str) -> dict | None:
  path = stage_path(args, stage)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def sweep(args) -> dict:
  rows = {'baseline': BASELINE, **sweep_candidates(args)}
  records = run_stage(args, 'sweep', rows, [args.sweep_seed], labels='binary',
                      epochs=args.epochs)
  chosen, floor = choose(records)
  return {'records': records, 'chosen': chosen['name'], 'chosen_hparams': chosen['hparams'],
          'accuracy_floor': floor}


def main_rows(chosen: dict) -> dict[str, dict]:
  cgl = {k: v for k, v in chosen.items() if k != 'weight_decay' and v}
  return {'baseline': BASELINE, 'rbn': dict(lambda_bn=chosen['lambda_bn']), 'cgl': cgl}


def main_stage(args, chosen: dict) -> dict:
  return {'records': run_stage(args, 'main', main_rows(chosen), args.seeds, labels='binary',
                               epochs=args.epochs,
                               reports=tuple(f'{row}_seed{args.seeds[0]}'
                                             for row in ('baseline', 'cgl')))}


def long_stage(args, chosen: dict) -> dict:
  return {'records': run_stage(args, 'long', main_rows(chosen), args.seeds[:1], labels='binary',
                               epochs=args.long_epochs)}


def classes45_stage(args, chosen: dict) -> dict:
  del chosen  # the weight-decay row only
  return {'records': run_stage(args, 'classes45', {'baseline': BASELINE}, args.classes45_seeds,
                               labels='classes45', epochs=args.epochs)}


def ablation_stage(args, chosen: dict) -> dict:
  del chosen  # fixed λ, not the sweep's
  bn, g, s = args.ablation_lambdas
  return {'records': run_stage(args, 'ablation',
                               {ABLATION_ROW: dict(lambda_bn=bn, lambda_g=g, lambda_s=s)},
                               args.seeds, labels='binary', epochs=args.epochs)}


def run_stages(args) -> None:
  wanted = STAGES if args.stage == 'all' else (args.stage,)
  results = {}
  for stage in STAGES[:-1]:
    results[stage] = load_stage(args, stage)
    if results[stage] is not None:
      if stage in wanted:
        print(f'== {stage}: done ({stage_path(args, stage)}), skipped ==', flush=True)
      continue
    if stage not in wanted or (stage == 'ablation' and not args.ablation_lambdas):
      continue
    if stage != 'sweep' and results['sweep'] is None:
      sys.exit(f'stage {stage} needs the sweep: run --stage=sweep first')
    started = time.perf_counter()
    chosen = results['sweep']['chosen_hparams'] if stage != 'sweep' else None
    result = {'sweep': sweep, 'main': main_stage, 'long': long_stage,
              'classes45': classes45_stage, 'ablation': ablation_stage}[stage](
        *((args,) if stage == 'sweep' else (args, chosen)))
    result.update(settings=settings_record(args), seconds=time.perf_counter() - started)
    write_json_atomic(stage_path(args, stage), result, indent=1)
    results[stage] = result
  if 'report' in wanted:
    import table1_report  # pylint: disable=g-import-not-at-top
    missing = [s for s in ('sweep', 'main') if results[s] is None]
    if missing:
      sys.exit(f'the report needs the stages {missing}: run them first')
    table1_report.write(args, results)


def settings_record(args) -> dict:
  return {key: getattr(args, key) for key in DEFAULTS}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--stage', default='all', choices=('all', *STAGES))
  parser.add_argument('--cpu', action='store_true',
                      help='the shrunken defaults for 2 CPU cores (CPU_DEFAULTS)')
  parser.add_argument('--root', default=os.path.join(REPO, 'runs', 'table1'),
                      help='where runs and stage records are written (resumable)')
  parser.add_argument('--results', default=os.path.join(REPO, 'RESULTS.md'))
  parser.add_argument('--figures', default=os.path.join(REPO, 'docs', 'figures'))
  parser.add_argument('--widths', type=int, nargs=2)
  parser.add_argument('--image-size', type=int)
  parser.add_argument('--augment', choices=('random_resized_crop', 'pad_crop', 'none'))
  parser.add_argument('--batch-size', type=int)
  parser.add_argument('--learning-rate', type=float)
  parser.add_argument('--schedule', choices=('step', 'warmup_cosine', 'constant'),
                      help="'step': ×0.1 every 30 epochs (the authors')")
  parser.add_argument('--initializer', choices=('pytorch', 'he_normal'),
                      help="conv/dense initialisation ('pytorch': PyTorch's default)")
  parser.add_argument('--epochs', type=int, help='epochs of the sweep and main runs')
  parser.add_argument('--long-epochs', type=int)
  parser.add_argument('--seeds', type=int, nargs='+')
  parser.add_argument('--sweep-seed', type=int)
  parser.add_argument('--classes45-seeds', type=int, nargs='+',
                      help='seeds of the 45-class weight-decay row (stage classes45)')
  parser.add_argument('--lambda-bn', type=float, nargs='+')
  parser.add_argument('--lambda-g', type=float, nargs='+')
  parser.add_argument('--lambda-s', type=float, nargs='+')
  parser.add_argument('--authors-run', type=int, choices=(0, 1),
                      help="1: the sweep includes the authors' run with orthogonality")
  parser.add_argument('--images-per-class', type=int,
                      help='shapes images per item pair (640: the full data set)')
  parser.add_argument('--ablation-lambdas', nargs='+', metavar='λ',
                      help="λ_bn λ_g λ_s of the ablation stage's CGL row, or 'none' to skip it")
  parser.add_argument('--run-axis', default='auto', choices=('auto', 'vmap', 'unroll'),
                      help="how the runs are stepped together (multirun.MultiRun): 'auto' is "
                           "'unroll' on the CPU and 'vmap' elsewhere")
  parser.add_argument('--diagnostic-images', type=int,
                      help='validation images for the group distance and L_s')
  args = parser.parse_args(argv)
  defaults = CPU_DEFAULTS if args.cpu else DEFAULTS
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.authors_run = bool(args.authors_run)
  if args.ablation_lambdas and [str(v).lower() for v in args.ablation_lambdas] == ['none']:
    args.ablation_lambdas = None
  if args.ablation_lambdas:
    try:
      args.ablation_lambdas = [float(v) for v in args.ablation_lambdas]
    except ValueError:
      parser.error(f'--ablation-lambdas takes three numbers (λ_bn λ_g λ_s) or none; got '
                   f'{args.ablation_lambdas}')
    if len(args.ablation_lambdas) != 3 or min(args.ablation_lambdas) < 0:
      parser.error(f'--ablation-lambdas takes three numbers ≥ 0 (λ_bn λ_g λ_s) or none; got '
                   f'{args.ablation_lambdas}')
  if args.sweep_seed in args.seeds:
    parser.error(f'--sweep-seed {args.sweep_seed} is one of the reported --seeds {args.seeds}: '
                 'tuning on a reported seed would bias the comparison')
  given = list(argv if argv is not None else sys.argv[1:])
  kept = [a for i, a in enumerate(given) if not a.startswith('--stage')
          and not (i and given[i - 1] == '--stage')]
  args.command = ' '.join(['python experiments/table1.py', *kept])
  return args


def main(argv=None):
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)  # multirun's per-epoch lines: progress, img/s, ETA
  run_stages(parse_args(argv))


if __name__ == '__main__':
  main()
