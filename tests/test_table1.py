"""experiments/table1.py: the statistics on analytic cases, and the whole command end to end on a
tiny setting (every stage, resume by skipping, RESULTS.md written from the numbers)."""
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import table1  # pylint: disable=g-import-not-at-top,wrong-import-position
import table1_report  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_paired_difference_t_interval_and_sign_flip_p():
  result = table1_report.paired_difference([1, 2, 3])
  assert result['mean'] == 2
  half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} · sd 1 / √3
  assert result['low'] == pytest.approx(2 - half) and result['high'] == pytest.approx(2 + half)
  assert result['p'] == pytest.approx(2 / 8)  # only all-plus and all-minus reach |mean| 2
  zero = table1_report.paired_difference([1, -1])
  assert zero['p'] == 1.0 and zero['low'] < 0 < zero['high']
  single = table1_report.paired_difference([3])
  assert math.isnan(single['low']) and single['p'] == 1.0


def _record(row, seed, conv2, change=None, top1=0.99):
  detectors = [{'iou_threshold': t, 'unique_detectors': conv2,
                'unique_detectors_per_category': {}} for t in (0.04, 0.08)]
  diagnostics = {} if change is None else {'change_vs_baseline': {'conv2': change}}
  return {'row': row, 'seed': seed, 'diagnostics': diagnostics, 'best_val_top1': top1,
          'dissection': {m: {'layers': {'conv2': detectors}} for m in table1.MEASUREMENTS}}


def _conclusion(seeds, change, top1=0.99, *, rbn_change=None, rbn_top1=0.99):
  records = []
  rbn_change = change if rbn_change is None else rbn_change
  for seed in range(seeds):
    records += [_record('baseline', seed, 6, top1=top1),
                _record('rbn', seed, 7, rbn_change, top1=rbn_top1),
                _record('cgl', seed, 9 + seed % 2, change)]
  paired = {(row, view): table1_report.paired_difference(
      table1_report.seed_pairs(records, row, view))
      for row in ('cgl', 'rbn') for view in table1_report.VIEWS}
  assert paired[('cgl', table1_report.VIEWS[0])]['differences'] == [3 + s % 2 for s in range(seeds)]
  return '\n'.join(table1_report.conclusion(
      records, paired=paired, moved_cgl=table1_report.moved(records, 'cgl'),
      moved_rbn=table1_report.moved(records, 'rbn')))


def test_conclusion_follows_the_numbers_and_refuses_unsettled_cases():
  settled = _conclusion(4, change=0.3)
  assert 'CGL has MORE conv2 unique detectors' in settled and 'Not settled' not in settled
  assert 'Not settled' in _conclusion(4, change=0.02)  # the regularizers did not act
  assert 'only 2 seed(s)' in _conclusion(2, change=0.3)
  assert 'not trained' in _conclusion(4, change=0.3, top1=0.55)
  assert 'Not settled' in _conclusion(4, change=0.3, top1=0.55)  # weight decay did not learn
  # An R_bn row that did not learn or act voids its own comparison, not the CGL headline.
  rbn_untrained = _conclusion(4, change=0.3, rbn_top1=0.55)
  assert 'Not settled' not in rbn_untrained and 'CGL has MORE' in rbn_untrained
  assert '- R_bn alone: the R_bn runs reach 55.0 % validation top-1' in rbn_untrained
  rbn_idle = _conclusion(4, change=0.3, rbn_change=0.02)
  assert 'Not settled' not in rbn_idle
  assert "R_bn alone: the R_bn runs' conv2 group norms" in rbn_idle
  assert 'R_bn alone' not in settled


def test_change_against_another_stages_weight_decay_run():
  baseline = {'row': 'baseline', 'seed': 3, 'diagnostics': {'group_norms': {'conv2': [3.0, 4.0]}}}
  record = {'row': 'cgl_fixed', 'seed': 3, 'diagnostics': {'group_norms': {'conv2': [0.0, 0.0]}}}
  unpaired = dict(record, seed=4)
  out = table1_report.with_change_vs_baseline([record, unpaired], [baseline])
  assert out[0]['diagnostics']['change_vs_baseline'] == {'conv2': 1.0}  # ‖0 − (3, 4)‖ / 5
  assert 'change_vs_baseline' not in out[1]['diagnostics']
  assert 'change_vs_baseline' not in record['diagnostics']  # the input is left alone


@pytest.mark.parametrize('values, message', [
    (['1e-2', 'x', '0'], 'takes three numbers'), (['1e-2', '0'], 'takes three numbers ≥ 0')])
def test_bad_ablation_lambdas_are_named(values, message, capsys):
  with pytest.raises(SystemExit):
    table1.parse_args(['--ablation-lambdas', *values])
  assert message in capsys.readouterr().err


@pytest.mark.slow  # six stages, each compiling its own train step and dissection
def test_the_command_runs_every_stage_and_resumes(tmp_path, capsys):
  root, results = tmp_path / 'root', tmp_path / 'RESULTS.md'
  argv = ['--root', str(root), '--results', str(results), '--figures', str(tmp_path / 'fig'),
          '--widths', '5', '10', '--image-size', '16', '--images-per-class', '5',
          '--batch-size', '16', '--epochs', '1', '--long-epochs', '1', '--seeds', '0', '1',
          '--classes45-seeds', '0', '--lambda-bn', '1e-2', '--lambda-g', '1e-2',
          '--lambda-s', '1e-2', '--authors-run', '0', '--diagnostic-images', '32',
          '--ablation-lambdas', '1e-2', '0', '1e-2',
          '--run-axis', 'vmap']  # one compiled copy of the step per stage
  table1.main(argv)
  for stage in table1.STAGES[:-1]:
    assert (root / f'{stage}.json').exists()
  main = json.loads((root / 'main.json').read_text())
  assert sorted(r['name'] for r in main['records']) == sorted(
      f'{row}_seed{s}' for row in table1.ROWS for s in (0, 1))
  text = results.read_text()
  assert 'Not settled' in text and 'only 2 seed(s)' in text
  assert '## Seed-paired differences' in text and '## Faithfulness check' in text
  assert '## Ablation: CGL at fixed λ (λ_bn 0.01, λ_g 0, λ_s 0.01)' in text
  assert '- Ablation, CGL at fixed λ_bn 0.01, λ_g 0, λ_s 0.01 (not tuned)' in text
  ablation = json.loads((root / 'ablation.json').read_text())
  assert sorted(r['name'] for r in ablation['records']) == ['cgl_fixed_seed0', 'cgl_fixed_seed1']
  for name in ('unique_detectors.png', 'unique_detectors_authors.png',
               'conv2_units_wd_vs_cgl.png'):
    assert (tmp_path / 'fig' / name).exists()
  capsys.readouterr()
  table1.main(argv + ['--stage', 'main'])  # done: skipped, nothing retrained
  assert 'main: done' in capsys.readouterr().out


def test_tuning_on_a_reported_seed_is_refused():
  with pytest.raises(SystemExit):
    table1.parse_args(['--seeds', '0', '100', '--sweep-seed', '100'])
