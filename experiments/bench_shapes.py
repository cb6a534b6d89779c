"""Times generating the synthetic shapes dataset (both splits) on one core.

    python3 experiments/bench_shapes.py                      # generator only
    python3 experiments/bench_shapes.py --tfds --broden       # + tfds build, Broden export

Prints the time of each stage of `cgl_jax.data.shapes.generate` (layout
sampling, rasterising the label maps, colouring), images per second, each
stage's share, and the whole set's time as a fraction of the one-minute budget
the generator was designed for. `--tfds` also builds `cgl_shapes/binary` into a
temporary data_dir (PNG encoding dominates), `--broden` exports the validation
split as a Broden directory.
"""
import argparse
import tempfile
import time

from cgl_jax.data import shapes

BUDGET_S = 60.0


def _timed(fn, *args, **kwargs):
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - start


def bench_generator(*, seed: int, images_per_class: int) -> float:
  stages = {'sample_layout': 0.0, 'render': 0.0, 'to_rgb': 0.0}
  num_images = 0
  for split in shapes.SPLITS:
    layout, seconds = _timed(shapes.sample_layout, split, seed=seed,
                             images_per_class=images_per_class)
    stages['sample_layout'] += seconds
    (color_map, _), seconds = _timed(shapes.render, layout)
    stages['render'] += seconds
    _, seconds = _timed(shapes.to_rgb, color_map)
    stages['to_rgb'] += seconds
    num_images += len(layout)
  total = sum(stages.values())
  print(f'generator: {num_images} images (both splits, {images_per_class} per class) '
        f'in {total:.2f} s = {num_images / total:,.0f} images/s; '
        f'{total / BUDGET_S:.1%} of the {BUDGET_S:.0f} s budget')
  for name, seconds in stages.items():
    print(f'  {name:<14} {seconds:6.2f} s  {seconds / total:6.1%}')
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--images_per_class', type=int, default=640)
  parser.add_argument('--tfds', action='store_true', help='also time the tfds build')
  parser.add_argument('--broden', action='store_true', help='also time the Broden export')
  args = parser.parse_args()

  generator_s = bench_generator(seed=args.seed, images_per_class=args.images_per_class)
  if args.tfds:
    import tensorflow_datasets as tfds
    from cgl_jax.data import shapes_tfds
    config = shapes_tfds.CglShapesConfig(
        name=f'bench_{args.images_per_class}', setting='binary', seed=args.seed,
        images_per_class=args.images_per_class)
    with tempfile.TemporaryDirectory() as data_dir:
      builder = tfds.builder('cgl_shapes', config=config, data_dir=data_dir)
      _, seconds = _timed(builder.download_and_prepare)
    print(f'tfds build: {seconds:.2f} s = {seconds / generator_s:.1f}× the generator')
  if args.broden:
    with tempfile.TemporaryDirectory() as directory:
      _, seconds = _timed(shapes.export_broden, f'{directory}/shapes', seed=args.seed,
                          images_per_class=args.images_per_class)
    print(f'Broden export (validation split): {seconds:.2f} s = '
          f'{seconds / generator_s:.1f}× the whole generator')


if __name__ == '__main__':
  main()
