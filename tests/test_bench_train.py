"""experiments/bench_train.py: the target verdict, the kernel kinds and tiny end-to-end runs."""
import json
import os
import sys

import pytest

from cgl_jax import kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))
import bench_train  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize('ratios, verdict', [
    ([1.02, 1.10, 1.05], 'met'),                               # the bound itself counts as met
    ([0.97, 1.03, 1.04, 1.05, 1.05, 1.06, 1.07, 1.09, 1.13], 'met'),  # one noisy round over
    ([1.01, 1.03, 1.06, 1.08, 1.09, 1.10, 1.11, 1.12, 1.15], 'on the line'),
    ([1.09, 1.11, 1.08], 'on the line'),                       # too few rounds to tell
    ([1.12, 1.101, 1.2], 'missed'),
])
def test_target_verdict(ratios, verdict):
  assert bench_train.target_verdict(ratios) == verdict


@pytest.mark.parametrize('n, k', [(3, 1), (5, 1), (6, 1), (8, 2), (9, 2), (15, 4), (25, 8)])
def test_median_interval_uses_the_binomial_order_statistics(n, k):
  low, high, coverage = bench_train.median_interval(list(range(n, 0, -1)))
  assert (low, high) == (k, n + 1 - k)  # the k-th smallest and largest of 1..n
  # Coverage 1 − 2·P(B < k), B ~ Binomial(n, ½), checked by enumerating outcomes.
  tail = sum(1 for outcome in range(2**n) if bin(outcome).count('1') < k) / 2**n
  assert coverage == pytest.approx(1 - 2 * tail)
  assert coverage >= bench_train.CONFIDENCE or k == 1


def test_tiny_run_reports_per_round_ratios(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert bench_train.main(['--models=shapes_small', '--batch_size=4', '--steps=1', '--warmup=0',
                           '--repeats=2', f'--json={out}']) == 0
  result, = json.loads(out.read_text())['results']
  ce, cgl = result['all_seconds_per_step']['ce'], result['all_seconds_per_step']['cgl']
  assert result['cgl_over_ce_time_per_round'] == pytest.approx([b / a for a, b in zip(ce, cgl)])
  assert result['target'] == bench_train.target_verdict(result['cgl_over_ce_time_per_round'])
  assert result['target'] in capsys.readouterr().out


@pytest.mark.parametrize('flag', ['--steps=0', '--repeats=0', '--warmup=-1'])
def test_bad_counts_are_rejected_by_name(flag, capsys):
  with pytest.raises(SystemExit):
    bench_train.main(['--models=shapes_small', flag])
  assert f'--{flag[2:].split("=")[0]} must be >=' in capsys.readouterr().err


def test_compare_kernels_adds_a_timed_kind_per_value(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  assert bench_train.main(['--models=shapes_small', '--batch_size=4', '--steps=1', '--warmup=0',
                           '--repeats=1', '--kernels=jnp', '--compare_kernels=loop',
                           f'--json={out}']) == 0
  result, = json.loads(out.read_text())['results']
  assert set(result['seconds_per_step']) == {'ce', 'cgl', 'cgl[loop]'}
  assert result['kernels'] == {
      'cgl': {'config': 'jnp', 'pair_sums': 'jnp', 'per_map': 'jnp'},
      'cgl[loop]': {'config': 'loop', 'pair_sums': 'loop', 'per_map': 'jnp'}}
  assert "cgl[loop]: kernels='loop': L_g pair sums loop, L_s per-map jnp" in (
      capsys.readouterr().out)


def test_unknown_kernels_are_rejected_by_name(capsys):
  with pytest.raises(SystemExit):
    bench_train.main(['--models=shapes_small', '--compare_kernels=fast'])
  assert f"unknown --compare_kernels ['fast']; choose from {kernels.CHOICES}" in (
      capsys.readouterr().err)
