r"""Benchmark: our dissection vs a straightforward NumPy NetDissect-Lite, in one run.

Both dissect the same ShapesCNN layers on the same shapes probe set (the validation split exported
in Broden format) with the same jitted forward pass; they differ in what NetDissect-Lite does
differently:

  ours        cgl_jax.dissect.probe.dissect_layers: streaming exact quantile (two passes), batched
              upsample + threshold + IoU tally under jit, memory independent of #images;
  reference   cgl_jax.dissect.reference: every activation stored in a float64 memmap [N, C, h, w]
              (as the reference does), numpy.quantile over it, then the tally image by image and
              unit by unit with PIL's bilinear upsampling.

Each side runs in its own subprocess (peak RSS = ru_maxrss), at N/2 and N images, to show how
time and memory scale. Both must agree: the script prints the largest IoU difference.

    python experiments/bench_dissect.py                       # 540 and 1,080 images, ShapesCNN 32/64
    python experiments/bench_dissect.py --images_per_class=240 --sizes=1080,2160 --json=out.json
    python experiments/bench_dissect.py --config=configs/shapes.py --workdir=/tmp/shapes

"steady" times a second dissection in the same process (all executables compiled), "cold" the
first (with jit compilation, ~4 s on CPU); process start and model setup are reported apart.
Ours streams the probe set from its files in every pass (`probe_cache='none'`); a third run in
the same process keeps it on the device (`'device'`: decoded once) and reports its time and its
ratio to the streamed one.

Measured figures, with their commands and machines: docs/benchmarks.md."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_atomic  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default=None,
                      help='config file[:variant] of a trained run (with --workdir)')
  parser.add_argument('--workdir', default=None, help='trained run to restore (latest step)')
  parser.add_argument('--widths', default='32,64', help='random-init ShapesCNN conv widths')
  parser.add_argument('--layers', default='conv1,conv2')
  parser.add_argument('--images_per_class', type=int, default=120,
                      help='shapes generator size; validation = 45·0.2·this images (1,080)')
  parser.add_argument('--sizes', default=None,
                      help='comma-separated probe sizes to time (default: N/2 and N)')
  parser.add_argument('--repeats', type=int, default=1,
                      help='alternating ours/reference rounds; the table shows medians')
  parser.add_argument('--json', default=None, help='also write the results to this file')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--quantile', type=float, default=0.005)
  parser.add_argument('--cache', default=os.path.join(tempfile.gettempdir(), 'cgl_bench_dissect'),
                      help='where the Broden export and the reference memmaps go')
  parser.add_argument('--role', choices=['ours', 'reference'], default=None,
                      help=argparse.SUPPRESS)  # internal: one measurement in a subprocess
  parser.add_argument('--num_images', type=int, default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def load_model(args):
  """(model, variables, mean, std) from a trained workdir or a random-init ShapesCNN."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cgl_jax import models  # pylint: disable=g-import-not-at-top
  if args.workdir:
    # pylint: disable-next=g-import-not-at-top
    from cgl_jax import checkpoints, default_config, input_pipeline
    config = default_config.load_config_file(
        args.config or os.path.join(REPO_ROOT, 'configs', 'shapes.py'))
    model, variables, _ = checkpoints.restore_model(config, args.workdir)
    mean, std = input_pipeline.normalization(config.dataset)
    return model, variables, tuple(mean), tuple(std)
  widths = tuple(int(w) for w in args.widths.split(','))
  model = models.create('shapes_cnn', num_classes=2, widths=widths)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  return model, variables, IMAGENET_MEAN, IMAGENET_STD


def probe_set(args):
  from cgl_jax.data import broden, shapes  # pylint: disable=g-import-not-at-top
  directory = os.path.join(args.cache, f'broden_shapes_validation_ipc{args.images_per_class}')
  if not os.path.isdir(directory):
    shapes.export_broden(directory, split='validation', images_per_class=args.images_per_class)
  return broden.Broden(directory)


def measure_ours(args, data, model, variables, mean, std):
  """Two dissections of the same probe set in one process: the first compiles (cold), the second
  is the steady state a long dissection converges to (all executables cached)."""
  from cgl_jax.dissect import probe  # pylint: disable=g-import-not-at-top
  from cgl_jax.dissect import tally  # pylint: disable=g-import-not-at-top
  from cgl_jax.dissect.settings import DissectionSettings  # pylint: disable=g-import-not-at-top
  settings = DissectionSettings(layers=tuple(args.layers.split(',')), mean=mean, std=std,
                                quantile=args.quantile, batch_size=args.batch_size,
                                image_size=64, top_images=10, probe_cache='none')
  passes = {}
  run = lambda cache='none': probe.dissect_layers(
      model, variables, data, dataclasses.replace(settings, probe_cache=cache),
      show_progress=False, timings=passes)
  start = time.perf_counter()
  run()
  cold = time.perf_counter() - start
  passes.clear()
  start = time.perf_counter()
  results = run()
  seconds = time.perf_counter() - start
  primary = data.primary_category_index()
  ious = {name: tally.iou(result.counts, primary).tolist() for name, result in results.items()}
  streamed_passes = dict(passes)
  # The same dissection with the probe set decoded once and kept on the device (the IoUs equal).
  start = time.perf_counter()
  cached = run('device')
  cached_seconds = time.perf_counter() - start
  for name, result in cached.items():
    np.testing.assert_array_equal(tally.iou(result.counts, primary), ious[name])
  return {'seconds': seconds, 'cold_seconds': cold, 'passes': streamed_passes,
          'probe_cache_device_seconds': cached_seconds}, ious, 0


def measure_reference(args, data, model, variables, mean, std):
  from cgl_jax.dissect import probe, reference, tally  # pylint: disable=g-import-not-at-top
  layers = args.layers.split(',')
  forward = probe.make_forward(model, layers=layers, mean=mean, std=std)
  start = time.perf_counter()
  forward(variables, np.zeros((args.batch_size, 64, 64, 3), np.uint8))  # compile (cached: ours too)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  features, memmap_bytes = {}, 0
  memmap_dir = tempfile.mkdtemp(dir=args.cache, prefix='memmaps-')
  for batch in data.batches(batch_size=args.batch_size, image_size=64, categories=()):
    size = len(batch['index'])
    images = np.concatenate([batch['image'], np.zeros((args.batch_size - size, 64, 64, 3),
                                                      np.uint8)])
    activations = forward(variables, images)
    for name in layers:
      maps = np.moveaxis(np.asarray(activations[name])[:size], 3, 1)  # [b, C, h, w]
      if name not in features:
        features[name] = np.memmap(os.path.join(memmap_dir, f'{name}.mmap'), dtype=np.float64,
                                   mode='w+', shape=(len(data),) + maps.shape[1:])
        memmap_bytes += features[name].nbytes
      features[name][batch['index']] = maps
  onehot = tally.category_onehot(data.primary_category_index(), len(data.categories))
  ious = {}
  for name in layers:
    # np.percentile over the stored activations, as NetDissect-Lite's quantile_threshold does.
    thresholds = np.percentile(features[name], 100 * (1 - args.quantile), axis=(0, 2, 3))
    examples = reference.examples_from_batches(
        data.batches(batch_size=args.batch_size, image_size=64), data.categories)
    counts = reference.tally(features[name], thresholds, examples, category_onehot=onehot)
    ious[name] = tally.iou(counts, data.primary_category_index()).tolist()
  seconds = time.perf_counter() - start
  timing = {'seconds': seconds, 'cold_seconds': seconds + compile_seconds}
  for name in layers:
    del features[name]
  for file in os.listdir(memmap_dir):
    os.remove(os.path.join(memmap_dir, file))
  os.rmdir(memmap_dir)
  return timing, ious, memmap_bytes


def child(args):
  started = time.perf_counter()
  model, variables, mean, std = load_model(args)
  data = probe_set(args).head(args.num_images)
  setup = time.perf_counter() - started  # imports, model init / restore, index parsing
  measure = measure_ours if args.role == 'ours' else measure_reference
  timing, ious, memmap_bytes = measure(args, data, model, variables, mean, std)
  import jax  # pylint: disable=g-import-not-at-top
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  print(json.dumps({'role': args.role, 'images': len(data), **timing, 'setup_seconds': setup,
                    'peak_rss_mb': peak_mb, 'memmap_mb': memmap_bytes / 2**20,
                    'device': device.device_kind,
                    'peak_device_mb': stats.get('peak_bytes_in_use', 0) / 2**20, 'iou': ious}))


def spawn(argv, role, num_images):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             TF_CPP_MIN_LOG_LEVEL='3', XLA_PYTHON_CLIENT_PREALLOCATE='false')
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f'--role={role}',
                         f'--num_images={num_images}'], capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f'{role} run failed:\n{proc.stderr[-4000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  os.makedirs(args.cache, exist_ok=True)
  if args.role:
    return child(args)
  total = len(probe_set(args))  # exports the probe set once, before the timed runs
  sizes = sorted({int(s) for s in args.sizes.split(',')} if args.sizes else {total // 2, total})
  if sizes[-1] > total:
    raise ValueError(f'--sizes {sizes} exceed the probe set ({total} images): raise '
                     '--images_per_class')
  print(f'probe set: shapes validation in Broden format, {total} images 64×64 '
        f'(masks 64×64, 15 concepts); layers {args.layers}; quantile {args.quantile}; '
        f'model {"restored from " + args.workdir if args.workdir else "ShapesCNN " + args.widths + " (random init)"}',
        flush=True)
  runs = {}
  for repeat in range(args.repeats):  # ours and the reference alternate: load drifts hit both
    for size in sizes:
      for role in ('ours', 'reference'):
        started = time.perf_counter()
        run = spawn(argv, role, size)
        runs.setdefault((role, size), []).append(run)
        extra = ('  passes ' + ', '.join(f'{k} {v:.2f} s' for k, v in run['passes'].items())
                 + f'; probe set cached on the device: {run["probe_cache_device_seconds"]:.2f} s '
                 f'(×{run["probe_cache_device_seconds"] / run["seconds"]:.2f} of streamed)'
                 if 'passes' in run else '')
        print(f'  [{repeat + 1}/{args.repeats}] {role:9s} {size:5d} images on {run["device"]}: '
              f'steady {run["seconds"]:7.2f} s ({size / run["seconds"]:7.1f} img/s), with '
              f'compile {run["cold_seconds"]:7.2f} s, setup {run["setup_seconds"]:4.1f} s, peak '
              f'RSS {run["peak_rss_mb"]:7.1f} MB, memmaps {run["memmap_mb"]:6.1f} MB '
              f'[process {time.perf_counter() - started:.0f} s]{extra}', flush=True)

  median = lambda role, size, key: float(np.median([r[key] for r in runs[role, size]]))
  print(f'\nmedians of {args.repeats} run(s); steady = executables compiled, "cold" = first '
        'dissection in a fresh process incl. jit compilation (process start and setup excluded)')
  print('images  ours steady img/s  ours cold img/s  reference img/s  speed-up steady  '
        'speed-up cold  ours peak MB  reference peak MB  max |ΔIoU|')
  table = []
  for size in sizes:
    ours, ref = runs['ours', size][-1], runs['reference', size][-1]
    delta = max(float(np.max(np.abs(np.subtract(ours['iou'][n], ref['iou'][n]))))
                for n in ours['iou'])
    row = {'images': size,
           'ours_img_s': size / median('ours', size, 'seconds'),
           'ours_cold_img_s': size / median('ours', size, 'cold_seconds'),
           'reference_img_s': size / median('reference', size, 'seconds'),
           'speedup': median('reference', size, 'seconds') / median('ours', size, 'seconds'),
           'speedup_cold': (median('reference', size, 'cold_seconds')
                            / median('ours', size, 'cold_seconds')),
           'ours_peak_mb': median('ours', size, 'peak_rss_mb'),
           'reference_peak_mb': median('reference', size, 'peak_rss_mb'),
           'max_abs_iou_difference': delta}
    table.append(row)
    print(f'{size:6d}  {row["ours_img_s"]:17.1f}  {row["ours_cold_img_s"]:15.1f}  '
          f'{row["reference_img_s"]:15.1f}  {row["speedup"]:14.1f}×  {row["speedup_cold"]:12.1f}×  '
          f'{row["ours_peak_mb"]:12.1f}  {row["reference_peak_mb"]:17.1f}  {delta:.2e}')
  small, large = table[0], table[-1]
  print(f'\npeak RSS growth from {small["images"]} to {large["images"]} images: ours '
        f'{large["ours_peak_mb"] - small["ours_peak_mb"]:+.1f} MB, reference '
        f'{large["reference_peak_mb"] - small["reference_peak_mb"]:+.1f} MB (its memmaps: '
        f'{runs["reference", large["images"]][-1]["memmap_mb"]:.1f} MB)')
  if args.json:
    write_json_atomic(args.json, {
        'argv': argv, 'device': runs['ours', sizes[0]][-1]['device'], 'table': table,
        'runs': {f'{role}@{size}': [{k: v for k, v in r.items() if k != 'iou'} for r in rs]
                 for (role, size), rs in runs.items()}}, indent=1)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
