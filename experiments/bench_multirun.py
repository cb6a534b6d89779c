"""Images per second of one vmapped multirun step (R runs at once) against R = 1.

    python3 experiments/bench_multirun.py                                  # tiny and paper
    python3 experiments/bench_multirun.py --sizes paper --runs 1,3,15 --json out.json

For each size and each R in --runs: a `multirun.MultiRun` of R runs of the shapes Table-1
objective (rows cycle through baseline (weight decay), R_bn and CGL; seeds 0, 1, …; the terms
every row needs are computed for all), data and augmentation on the device. It compiles one
step, runs --warmup steps, then times --steps steps (wall clock, synchronised at the end) in
each of --repeats rounds and reports the median: ms per step, img/s = R·B·steps / time, and
the speed-up R·t(1) / t(R) (R = 1 must be in --runs; 1 = no gain from running together, R =
the R runs cost one), for each way of going over the runs (--run_axes: 'vmap' batches them,
'unroll' puts R copies of one run's step into it; see `multirun.MultiRun`). The same command
runs on any backend jax picks.

With --epoch_loops scan,host it also times whole epochs (`MultiRun.train_epoch`) of the largest
R under each epoch loop (`multirun.MultiRun`'s `epoch_loop`): one untimed epoch (compile), then
--repeats timed epochs; it prints the seconds per epoch and the ratio to the first loop named.

Sizes:
  tiny   ShapesCNN 4/10 on 16-px images, 2 groups (the test network)
  small  ShapesCNN 16/32 on 32-px images, pad-crop (configs/shapes.py `small`)
  paper  ShapesCNN 128/256 on 64-px images, random-resized crop (the authors' recipe)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

from cgl_jax import default_config, multirun
from cgl_jax.data import device_data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_atomic  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # name → (widths, image size, augmentation, CGL groups)
    'tiny': ((4, 10), 16, 'random_resized_crop', 2),
    'small': ((16, 32), 32, 'pad_crop', 5),
    'paper': ((128, 256), 64, 'random_resized_crop', 5),
}
ROW_CYCLE = (('baseline', dict(weight_decay=1e-4)), ('rbn', dict(lambda_bn=1e-3)),
             ('cgl', dict(lambda_bn=1e-3, lambda_g=1e-2, lambda_s=1e-3)))


def bench_config(size: str, batch_size: int):
  widths, image_size, augment, groups = SIZES[size]
  config = default_config.load_config_file(os.path.join(REPO, 'configs', 'shapes.py') + ':cgl,paper')
  config.model.kwargs.widths = widths
  config.dataset.image_size = image_size
  config.dataset.augment = augment
  config.cgl.num_groups = groups
  config.batch_size = batch_size
  config.num_epochs = 1
  return config


def bench_specs(num_runs: int) -> list[multirun.RunSpec]:
  """R runs cycling through the rows; R = 1 is the CGL row (the most expensive objective)."""
  if num_runs == 1:
    return [multirun.RunSpec('cgl_seed0', 0, **ROW_CYCLE[2][1])]
  return [multirun.RunSpec(f'{ROW_CYCLE[i % 3][0]}_seed{i}', i, **ROW_CYCLE[i % 3][1])
          for i in range(num_runs)]


def time_step(config, specs, split, args, run_axis: str = 'vmap') -> list[float]:
  """Seconds per step, one value per round."""
  trainer = multirun.MultiRun(config, specs, num_train_examples=len(split), run_axis=run_axis)
  state = trainer.init_state()
  orders = trainer.epoch_orders(state, len(split))
  for _ in range(1 + args.warmup):  # compile + warm-up
    state, terms = trainer.train_step(state, split, orders)
  jax.block_until_ready(terms)
  rounds = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      state, terms = trainer.train_step(state, split, orders)
    jax.block_until_ready((state.params, terms))
    rounds.append((time.perf_counter() - start) / args.steps)
  return rounds


def bench_size(size: str, args) -> dict:
  config = bench_config(size, args.batch_size)
  split = device_data.shapes_splits('binary', image_size=config.dataset.image_size,
                                    images_per_class=args.images_per_class)['train']
  result = {'size': size, 'widths': list(config.model.kwargs.widths),
            'image_size': config.dataset.image_size, 'augment': config.dataset.augment,
            'batch_size_per_run': args.batch_size, 'steps': []}
  for num_runs in args.runs:
    # R = 1 is the same computation either way: timed once.
    for run_axis in (args.run_axes[:1] if num_runs == 1 else args.run_axes):
      rounds = time_step(config, bench_specs(num_runs), split, args, run_axis)
      seconds = statistics.median(rounds)
      result['steps'].append({
          'runs': num_runs, 'run_axis': run_axis, 'seconds_per_step_rounds': rounds,
          'ms_per_step': seconds * 1e3,
          'images_per_second': num_runs * args.batch_size / seconds})
      print(f'{size:6s} R={num_runs:<3d} {run_axis:5s} {seconds * 1e3:10.2f} ms/step '
            f'{num_runs * args.batch_size / seconds:10.1f} img/s', flush=True)
  single = [entry['ms_per_step'] for entry in result['steps'] if entry['runs'] == 1]
  for entry in result['steps']:
    if single:
      entry['speedup_vs_separate'] = entry['runs'] * single[0] / entry['ms_per_step']
  return result


def time_epoch_loops(size: str, args) -> dict:
  """Seconds per epoch of the largest R under each of --epoch_loops (default run axis)."""
  config = bench_config(size, args.batch_size)
  split = device_data.shapes_splits('binary', image_size=config.dataset.image_size,
                                    images_per_class=args.images_per_class)['train']
  specs = bench_specs(args.runs[-1])
  out = {'size': size, 'runs': len(specs), 'epochs': []}
  for loop in args.epoch_loops:
    trainer = multirun.MultiRun(config, specs, num_train_examples=len(split), epoch_loop=loop)
    state = trainer.init_state()
    state, means = trainer.train_epoch(state, split)  # compile
    jax.block_until_ready(means)
    rounds = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      state, means = trainer.train_epoch(state, split)
      jax.block_until_ready(means)
      rounds.append(time.perf_counter() - start)
    seconds = statistics.median(rounds)
    out['epochs'].append({'epoch_loop': loop, 'steps': trainer.steps_per_epoch,
                          'seconds_per_epoch_rounds': rounds, 'seconds_per_epoch': seconds,
                          'ratio_to_first': seconds / out['epochs'][0]['seconds_per_epoch']
                          if out['epochs'] else 1.0})
    print(f'{size:6s} R={len(specs):<3d} epoch loop {loop:5s} {seconds:8.2f} s/epoch '
          f'({trainer.steps_per_epoch} steps), ×{out["epochs"][-1]["ratio_to_first"]:.2f} of '
          f'{args.epoch_loops[0]}', flush=True)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='tiny,paper', help=f'comma-separated, from {list(SIZES)}')
  parser.add_argument('--runs', default='1,3', help='comma-separated numbers of runs R')
  parser.add_argument('--run_axes', default='vmap,unroll',
                      help=f'comma-separated, from {multirun.RUN_AXES} (see multirun.MultiRun)')
  parser.add_argument('--batch_size', type=int, default=32, help='per run')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per round')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--repeats', type=int, default=3, help='rounds (median reported)')
  parser.add_argument('--images_per_class', type=int, default=64,
                      help='train split size (45·0.8·this); the step time does not depend on it')
  parser.add_argument('--epoch_loops', default='',
                      help=f'comma-separated, from {multirun.EPOCH_LOOPS}: also time whole epochs')
  parser.add_argument('--json', default=None, help='also write the results to this JSON file')
  args = parser.parse_args(argv)
  sizes = [name.strip() for name in args.sizes.split(',') if name.strip()]
  if not sizes or sorted(set(sizes) - set(SIZES)):
    parser.error(f'--sizes: choose from {list(SIZES)}; got {args.sizes!r}')
  try:
    args.runs = sorted({int(value) for value in args.runs.split(',') if value.strip()})
  except ValueError:
    parser.error(f'--runs must be comma-separated integers; got {args.runs!r}')
  args.run_axes = [name.strip() for name in args.run_axes.split(',') if name.strip()]
  if not args.run_axes or sorted(set(args.run_axes) - set(multirun.RUN_AXES)):
    parser.error(f'--run_axes: choose from {multirun.RUN_AXES}; got {args.run_axes}')
  args.epoch_loops = [name.strip() for name in args.epoch_loops.split(',') if name.strip()]
  if sorted(set(args.epoch_loops) - set(multirun.EPOCH_LOOPS)):
    parser.error(f'--epoch_loops: choose from {multirun.EPOCH_LOOPS}; got {args.epoch_loops}')
  for flag, low in (('steps', 1), ('repeats', 1), ('warmup', 0), ('batch_size', 1)):
    if getattr(args, flag) < low:
      parser.error(f'--{flag} must be >= {low}; got {getattr(args, flag)}')
  if not args.runs or args.runs[0] < 1:
    parser.error(f'--runs must be >= 1; got {args.runs}')

  device = jax.devices()[0]
  print(f'device: {device.platform} {device.device_kind}; jax {jax.__version__}; batch '
        f'{args.batch_size} per run; {args.repeats} rounds × {args.steps} steps', flush=True)
  results = [bench_size(size, args) for size in sizes]
  if 1 in args.runs:
    print(f'\n{"size":6s} {"R":>3s} {"axis":5s} {"img/s":>10s} {"R·t(1)/t(R)":>12s}')
    for result in results:
      for entry in result['steps']:
        print(f'{result["size"]:6s} {entry["runs"]:3d} {entry["run_axis"]:5s} '
              f'{entry["images_per_second"]:10.1f} {entry["speedup_vs_separate"]:12.2f}')
  epochs = [time_epoch_loops(size, args) for size in sizes] if args.epoch_loops else []
  if args.json:
    write_json_atomic(args.json, {'device': f'{device.platform} {device.device_kind}',
                                  'jax': jax.__version__, 'command': ' '.join(sys.argv),
                                  'results': results, 'epoch_loops': epochs})
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
