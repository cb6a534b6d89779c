r"""Benchmark: value-and-grad of L_g + L_s, ours ('sampled', 'exact') vs a loop port.

Times, in one run and on one device, ``jax.jit(jax.value_and_grad(L_g + L_s))``
on soft masks ψ of shape [B, H, W, C] (default [256, 13, 13, 256], G = 5: AlexNet
conv5, per-sample reduction) for three implementations of L_g:

  sampled  cgl_jax.losses.group_coherence(pairs='sampled'): r = 3·f pairs, with the
           pair sums that ``--kernels`` names (default 'auto': what
           `cgl_jax.kernels.select` picks for this device, as the trainer does:
           C++ kernels on one CPU device where they build, else an XLA loop;
           Pallas kernels on one CUDA GPU; elsewhere matmuls with the ±1 pair
           incidence matrix).
  sampled_jnp, sampled_loop, sampled_matmul, sampled_cpu_ffi, sampled_pallas
           'sampled' with the named implementation of `cgl_jax.kernels.PAIR_SUMS`
           (to show why each platform gets the one it gets).
  exact    cgl_jax.losses.group_coherence(pairs='exact'): all f·(f−1) pairs,
           a scan over filter shifts.
  loop     A straightforward port of the authors' approach (PyTorch loop): a
           Python loop over groups and over the r = 3·f sampled pairs, each
           pair's two maps gathered as separate [B, H, W] tensors. It is jitted
           too (the loops unroll into one XLA program).

L_s is cgl_jax.losses.spatial_concentration with the L_s implementation that
``--kernels`` names, in all of them, so the differences come from L_g. Every
variant gets fresh pairs each step (PRNG key folded with the step); 'loop' and
'sampled' use the same pairs and must agree in value. Compilation (and one
warm-up call) is timed separately from the repeats; the table reports the median
over repeats and the ratios to 'sampled'.

  python3 experiments/bench_losses.py                     # full size
  python3 experiments/bench_losses.py --quick             # small shapes, seconds
  python3 experiments/bench_losses.py --json /tmp/bench.json --repeats 20
  python3 experiments/bench_losses.py --kernels loop      # the XLA code on the CPU
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from cgl_jax import kernels
from cgl_jax import losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import write_json_atomic  # pylint: disable=g-import-not-at-top


# ----------------------------------------------------------------------------
# The authors' approach, ported literally (for comparison only).
# ----------------------------------------------------------------------------


def loop_port_group_coherence(psi, num_groups, pair_indices):
  """L_g per group as the authors' PyTorch code computes it: loops over groups and pairs.

  NOT the library implementation. For each group g and each sampled pair
  (i, j) (the same pairs for every group), gather the two maps
  ψ[..., g·f + i] and ψ[..., g·f + j] as separate [B, H, W] tensors, compute
  the per-image soft Jaccard distance over H×W, average over images; the
  group's value is the mean over pairs. Returns [G].
  """
  group_size = psi.shape[-1] // num_groups
  values = []
  for g in range(num_groups):  # Python loop over groups (unrolled under jit)
    group = psi[..., g * group_size:(g + 1) * group_size]
    total = 0.0
    for t in range(pair_indices.shape[0]):  # Python loop over pairs
      p = group[..., pair_indices[t, 0]]  # [B, H, W]
      q = group[..., pair_indices[t, 1]]
      diff = jnp.sum(jnp.abs(p - q), axis=(1, 2))
      distance = 2 * diff / (jnp.sum(jnp.abs(p), axis=(1, 2))
                             + jnp.sum(jnp.abs(q), axis=(1, 2)) + diff)
      total = total + jnp.mean(distance)
    values.append(total / pair_indices.shape[0])
  return jnp.stack(values)


# ----------------------------------------------------------------------------
# The three objectives.
# ----------------------------------------------------------------------------


def make_objectives(num_groups, selection: kernels.Selection):
  """name → loss(psi, key) = L_g + L_s of one layer, with the selected implementations."""
  per_map = kernels.per_map(selection.per_map)

  def concentration(psi):
    return losses.spatial_concentration(psi, per_map=per_map)

  def sampled_with(pair_sums_name):
    pair_sums = kernels.pair_sums(pair_sums_name)

    def sampled(psi, key):
      return (losses.group_coherence(psi, num_groups, pairs='sampled', key=key,
                                     pair_sums=pair_sums).sum() + concentration(psi))
    return sampled

  def exact(psi, key):
    del key  # all pairs
    return losses.group_coherence(psi, num_groups, pairs='exact').sum() + concentration(psi)

  def loop(psi, key):
    group_size = psi.shape[-1] // num_groups
    # Same sampler and key as 'sampled', so both see the same pairs.
    pairs = losses.sample_pairs(key, group_size, 3 * group_size)
    return loop_port_group_coherence(psi, num_groups, pairs).sum() + concentration(psi)

  # Built on first use: a forced implementation may not exist here (e.g. Pallas on a CPU).
  objectives = {'sampled': lambda: sampled_with(selection.pair_sums), 'exact': lambda: exact,
                'loop': lambda: loop,
                **{f'sampled_{name}': (lambda name=name: sampled_with(name))
                   for name in kernels.PAIR_SUMS}}
  return objectives


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


def time_variant(name, objective, psi, key, *, repeats):
  """Compiles value-and-grad, warms up once, then times `repeats` calls."""
  step = jax.jit(jax.value_and_grad(objective))
  start = time.perf_counter()
  compiled = step.lower(psi, key).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  value, _ = jax.block_until_ready(compiled(psi, key))  # warm-up, not timed
  warmup_s = time.perf_counter() - start
  print(f'  {name:{NAME_WIDTH}s} compiled in {compile_s:.1f} s, warm-up call {warmup_s:.2f} s',
        flush=True)
  # One updating line on a terminal, one line per repeat in a log.
  carriage, end = ('\r', '') if sys.stdout.isatty() else ('', '\n')
  times, cpu_times = [], []
  for i in range(repeats):
    step_key = jax.random.fold_in(key, i + 1)
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(psi, step_key))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
    mean_s = sum(times) / len(times)
    print(f'{carriage}  {name:{NAME_WIDTH}s} repeat {i + 1}/{repeats}: {1 / mean_s:.2f} it/s, '
          f'ETA {mean_s * (repeats - i - 1):.1f} s', end=end, flush=True)
  if carriage:
    print(flush=True)
  return {'compile_s': compile_s, 'warmup_s': warmup_s,
          'median_ms': 1e3 * statistics.median(times),
          'min_ms': 1e3 * min(times), 'times_ms': [1e3 * t for t in times],
          'cpu_median_ms': 1e3 * statistics.median(cpu_times),
          'value': float(value)}


VARIANTS = ('sampled', 'exact', 'loop', *(f'sampled_{name}' for name in kernels.PAIR_SUMS))
NAME_WIDTH = max(map(len, VARIANTS))  # table column


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--size', type=int, default=13, help='feature map height = width')
  parser.add_argument('--channels', type=int, default=256)
  parser.add_argument('--groups', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--variants', default='sampled,exact,loop',
                      help='comma-separated subset of ' + ','.join(VARIANTS))
  parser.add_argument('--quick', action='store_true',
                      help='small shapes ([32, 13, 13, 64], G = 4) for a smoke run')
  parser.add_argument('--kernels', default='auto', choices=kernels.CHOICES,
                      help="implementations of 'sampled' and of L_s, as config.cgl.kernels")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', metavar='OUT', help='also write the results here')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.channels, args.groups = 32, 64, 4
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f'--variants: unknown {unknown}; choose from {", ".join(VARIANTS)}')
  if not 2 <= args.channels // max(args.groups, 1) or args.groups < 1:
    parser.error(f'--groups={args.groups} must be >= 1 and leave >= 2 filters per group '
                 f'of --channels={args.channels}')
  if args.repeats < 1:
    parser.error(f'--repeats must be >= 1; got {args.repeats}')
  args.variants = variants
  return args


def main(argv=None):
  args = parse_args(argv)
  shape = (args.batch, args.size, args.size, args.channels)
  group_size = args.channels // args.groups
  data_key, key = jax.random.split(jax.random.PRNGKey(args.seed))
  psi = jax.nn.sigmoid(jax.random.normal(data_key, shape, jnp.float32))
  platform = kernels.current_platform()
  selection = kernels.resolve(args.kernels, platform=platform, num_devices=jax.device_count(),
                              dtype=psi.dtype)
  print(f'value_and_grad(L_g + L_s), psi {list(shape)}, G = {args.groups} '
        f'(f = {group_size}, sampled pairs r = {3 * group_size}), '
        f'{args.repeats} repeats on {jax.devices()[0].device_kind} '
        f'({platform}), jax {jax.__version__}; --kernels={args.kernels}: pair sums '
        f'{selection.pair_sums}, L_s {selection.per_map}', flush=True)

  objectives = make_objectives(args.groups, selection)
  results = {}
  for name in args.variants:
    results[name] = time_variant(name, objectives[name](), psi, key, repeats=args.repeats)

  if 'loop' in results and 'sampled' in results:
    difference = abs(results['loop']['value'] - results['sampled']['value'])
    print(f"check: |loop − sampled| value on the same pairs = {difference:.2e}")
    if difference > 1e-4 * max(1.0, abs(results['sampled']['value'])):
      print('ERROR: the loop port and the library disagree', file=sys.stderr)
      return 1

  baseline = results.get('sampled')
  # cpu ms: this process's CPU time per call (all XLA threads); on a shared
  # CPU it is steadier than wall time, on a GPU it is host overhead only.
  print(f"\n{'variant':{NAME_WIDTH}s} {'compile s':>10s} {'median ms':>10s} {'min ms':>10s} "
        f"{'cpu ms':>10s} {'/ sampled':>10s}")
  for name, result in results.items():
    ratio = f"{result['median_ms'] / baseline['median_ms']:.2f}x" if baseline else '-'
    print(f"{name:{NAME_WIDTH}s} {result['compile_s']:10.1f} {result['median_ms']:10.1f} "
          f"{result['min_ms']:10.1f} {result['cpu_median_ms']:10.1f} {ratio:>10s}")
  if baseline:
    for name in VARIANTS[1:]:
      if name in results:
        print(f"{name}/sampled = {results[name]['median_ms'] / baseline['median_ms']:.2f} "
              f"(cpu time: "
              f"{results[name]['cpu_median_ms'] / baseline['cpu_median_ms']:.2f})")

  if args.json:
    write_json_atomic(args.json, {
        'shape': list(shape), 'groups': args.groups, 'repeats': args.repeats,
        'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
        'jax': jax.__version__, 'kernels': args.kernels,
        'pair_sums': selection.pair_sums, 'per_map': selection.per_map, 'results': results})
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
