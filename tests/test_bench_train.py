"""experiments/bench_train.py: the target verdict and a tiny end-to-end run writing its JSON."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))
import bench_train  # pylint: disable=g-import-not-at-top


@pytest.mark.parametrize('ratios, verdict', [
    ([1.02, 1.10, 1.05], 'met'),           # the bound itself counts as met
    ([1.09, 1.11, 1.08], 'on the line'),   # median under, one round over
    ([1.12, 1.101, 1.2], 'missed'),
])
def test_target_verdict(ratios, verdict):
  assert bench_train.target_verdict(ratios) == verdict


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
