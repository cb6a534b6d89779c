r"""Benchmark (CUDA only): L_g's sampled pair sums, Pallas kernels vs the ±1 incidence matmuls.

    python experiments/bench_pallas_pair_sums.py     # the sizes below, the library's settings
    python experiments/bench_pallas_pair_sums.py --settings=8x4,16x4,4x4,8x2,8x8

Times the vjp (forward + backward) of `cgl_jax.kernels.pallas.pair_l1` and of
`cgl_jax.kernels.xla.matmul_pair_l1` on ψ ``[B, HW, G·f]`` with r = 3·f random pairs
(B = 32, G = 5; HW from 13×13, AlexNet conv4/conv5, to 32×32, ShapesCNN conv2), checks that
the two agree (max relative difference, float32 rounding), and prints one line per size.
``--settings`` sweeps the kernels' pairs_per_program × num_warps. Median of ``--repeats``
calls after compiling and three warm-up calls.

Measured figures, with their commands and machines: docs/benchmarks.md."""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from cgl_jax import losses
from cgl_jax.kernels import pallas
from cgl_jax.kernels import xla

SIZES = ((169, 51), (169, 76), (256, 51), (576, 51), (1024, 51))  # (HW, f)


def median_ms(fn, *args, repeats: int) -> float:
  fn = jax.jit(fn)
  for _ in range(4):  # compile, then warm up
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def vjp_of(pair_sums, num_groups, **options):
  def value_and_grad(x, pairs, cotangent):
    value, pullback = jax.vjp(lambda m: pair_sums(m, pairs, num_groups=num_groups, **options), x)
    return value, pullback(cotangent)[0]
  return value_and_grad


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--groups', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=30)
  parser.add_argument('--settings',
                      default=f'{pallas.PAIRS_PER_PROGRAM}x{pallas.NUM_WARPS}',
                      help='pairs_per_program x num_warps, comma-separated')
  args = parser.parse_args()
  if jax.default_backend() != 'gpu':
    raise SystemExit(f'bench_pallas_pair_sums.py needs a CUDA GPU; the default backend is '
                     f'{jax.default_backend()!r}.')
  settings = [tuple(int(v) for v in item.split('x')) for item in args.settings.split(',')]
  print(jax.devices()[0].device_kind, 'jax', jax.__version__)
  for positions, group_size in SIZES:
    num_pairs = 3 * group_size
    x = jax.random.uniform(jax.random.key(0), (args.batch, positions, args.groups * group_size))
    pairs = losses.sample_pairs(jax.random.key(1), group_size, num_pairs)
    cotangent = jax.random.normal(jax.random.key(2), (args.batch, args.groups, num_pairs))
    matmul = vjp_of(xla.matmul_pair_l1, args.groups)
    reference = jax.jit(matmul)(x, pairs, cotangent)
    matmul_ms = median_ms(matmul, x, pairs, cotangent, repeats=args.repeats)
    line = (f'[{args.batch}, {positions}, {args.groups}, {group_size}] r={num_pairs}: matmul '
            f'{matmul_ms:.3f} ms')
    for per_program, warps in settings:
      kernel = vjp_of(pallas.pair_l1, args.groups, pairs_per_program=per_program,
                      num_warps=warps)
      got = jax.jit(kernel)(x, pairs, cotangent)
      error = max(float(jnp.abs(a - b).max() / jnp.abs(a).max()) for a, b in zip(reference, got))
      ms = median_ms(kernel, x, pairs, cotangent, repeats=args.repeats)
      line += f', pallas[{per_program}x{warps}] {ms:.3f} ms (rel. diff {error:.0e})'
    print(line, flush=True)


if __name__ == '__main__':
  main()
