"""Multi-process runs on one machine: 2 JAX processes on localhost, as on 2 hosts of a pod.

Each run is `multiprocess_util.run_processes` (fresh processes, a free port, a timeout, no process
left behind) over test_train's subprocess template, on test_train's tiny ShapesCNN and its
`cgl_shapes/binary_tiny` data. The reference is an in-process run with 1 process × 1 device: a run
that moves from 1 process to 2 (which are then preempted) and back through its checkpoints must
reach its parameters (1 process × N devices: test_train.test_eight_devices_match_one_device). A
killed process must stop the other with a clear error; 2 processes must dissect like one.
"""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from cgl_jax import checkpoints, default_config, dissect, distributed, train
from multiprocess_util import run_processes
from test_train import (_SUBPROCESS_TRAIN, _assert_params_equal, _shapes, data_dir,
                        flat_params)  # pylint: disable=unused-import  (fixture)

TIMEOUT = 300  # seconds for one multi-process run (a tiny one takes ~30 s on 2 busy cores)
# Seconds without a heartbeat before a process is declared dead (jax's default: 100 s): short
# where a death is the point of the test, longer elsewhere so that busy cores never fake one.
KILLED_HEARTBEAT_TIMEOUT = 5
HEARTBEAT_TIMEOUT = 30
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # XLA may sum a batch in another order per topology

_JOIN = '''
from cgl_jax import distributed
distributed.initialize(heartbeat_timeout_seconds={heartbeat})
'''


def _train_processes(*, workdir, prelude='', heartbeat=HEARTBEAT_TIMEOUT, **overrides):
  """Trains test_train.tiny_config(**overrides) in 2 processes; returns their results (a run
  that completes leaves each process's final params in workdir/params.process<i>.npz)."""
  program = _SUBPROCESS_TRAIN.format(
      prelude=_JOIN.format(heartbeat=heartbeat) + prelude, overrides=overrides,
      workdir=str(workdir), out=str(workdir / 'params.process{process}.npz'))
  return run_processes(program, num_processes=2, timeout=TIMEOUT, check=False)


def _max_difference(actual, expected):
  return max(float(np.max(np.abs(actual[name] - expected[name]))) for name in expected)


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
  """1 process × 1 device, 6 uninterrupted steps, a checkpoint after every step: the workdir."""
  workdir = tmp_path_factory.mktemp('straight')
  train.train_and_evaluate(_shapes(data_dir, num_train_steps=6, checkpoint_every_steps=1,
                                   keep_checkpoints=6), str(workdir))
  assert checkpoints.available_steps(workdir) == [1, 2, 3, 4, 5, 6]
  return workdir


def _params_at(workdir, step):
  return flat_params(checkpoints.restore_model(_shapes(None), workdir, step=step)[1]['params'])


# Process 1 gets SIGTERM (a preemption notice) as it starts step 5; from then on every step takes
# 0.5 s, so that the processes agree on a stopping step (5) before the run is over.
_PREEMPTED_AT_STEP_5 = '''
import os, signal, time
from cgl_jax import train as _train
_make_train_step = _train.make_train_step
def _make_slow_train_step(*args, **kwargs):
  step_fn = _make_train_step(*args, **kwargs)
  def slow_step(state, *rest):
    if int(state.step) >= 4:
      if jax.process_index() == 1 and int(state.step) == 4:
        os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.5)
    return step_fn(state, *rest)
  return slow_step
_train.make_train_step = _make_slow_train_step
'''


def test_checkpoints_move_between_one_and_two_processes(straight_run, data_dir, tmp_path):
  """Step 2 written by 1 process → resumed by 2 processes × 1 device, which get a preemption
  notice (SIGTERM to one of them) during step 5 and both stop after it, saving it → resumed by
  1 process to step 6. The 2-process checkpoint and the final parameters are those of the
  uninterrupted 1-process run."""
  workdir = tmp_path / 'run'
  shutil.copytree(straight_run, workdir)
  for step in range(3, 7):  # as if the 1-process run had stopped after step 2
    shutil.rmtree(workdir / checkpoints.CHECKPOINT_SUBDIR / str(step))
  assert checkpoints.available_steps(workdir) == [1, 2]
  results = _train_processes(workdir=workdir, prelude=_PREEMPTED_AT_STEP_5, num_train_steps=6,
                             checkpoint_every_steps=6, **{'dataset.data_dir': data_dir})
  stops = [re.search(r'PreemptedError: preempted: stopped after train step (\d) of 6',
                     result.stderr) for result in results]
  assert all(stops) and all(result.returncode not in (0, None) for result in results), (
      [(r.returncode, r.stderr[-3000:]) for r in results])
  stopped = int(stops[0].group(1))
  assert int(stops[1].group(1)) == stopped and stopped in (5, 6)
  assert checkpoints.available_steps(workdir) == [1, 2, stopped]
  two_processes = _params_at(workdir, stopped)

  one_process = train.train_and_evaluate(_shapes(data_dir, num_train_steps=6), str(workdir))
  for name, params, step in (
      (f'2 processes x 1 device, steps 3-{stopped}', two_processes, stopped),
      (f'then 1 process, steps {stopped + 1}-6', flat_params(one_process.params), 6)):
    expected = _params_at(straight_run, step)
    print(f'{name} vs 1 x 1: max |difference| {_max_difference(params, expected):.3g}')
    _assert_params_equal(params, expected, **TOLERANCE)


def test_initialize_names_inconsistent_arguments(monkeypatch):
  for name in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match=r'give both num_processes and process_id, or neither '
                                       r'\(detected\); got num_processes=2, process_id=None'):
    distributed.initialize(num_processes=2)
  with pytest.raises(ValueError, match=re.escape('process_id 2 not in [0, num_processes=2)')):
    distributed.initialize(num_processes=2, process_id=2)
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match=r"\$JAX_PROCESS_ID must be an integer, got 'one'"):
    distributed.initialize()


def test_distributed_outside_a_cluster_asks_for_the_coordinator(python_subprocess):
  python_subprocess("""
      import pytest
      from cgl_jax import distributed
      with pytest.raises(ValueError, match=r"(should|must) be defined. No cluster to detect "
                         r".*--coordinator_address, --num_processes, --process_id"):
        distributed.initialize()
      """, env={'JAX_COORDINATOR_ADDRESS': '', 'JAX_NUM_PROCESSES': '', 'JAX_PROCESS_ID': ''})


def test_only_errors_of_a_lost_peer_become_peer_process_errors(monkeypatch):
  gloo = ('UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] '
          'Read error [127.0.0.1]:50097: Connection reset by peer')
  with pytest.raises(ValueError, match='Gloo'):  # one process: nothing to lose
    with distributed.peer_failures_raise('testing'):
      raise ValueError(gloo)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(distributed.PeerProcessError, match=re.escape(
      f'process 0 of 2 lost a peer while testing: another process of this run stopped '
      f'(crashed, was killed or preempted), so the collective it was part of failed ({gloo})')):
    with distributed.peer_failures_raise('testing'):
      raise ValueError(gloo)
  with pytest.raises(ValueError, match='^shapes differ$'):
    with distributed.peer_failures_raise('testing'):
      raise ValueError('shapes differ')


# Process 1 SIGKILLs itself when it starts its third train step.
_DIE_AT_STEP_3 = '''
import os, signal
from cgl_jax import train as _train
_make_train_step = _train.make_train_step
def _make_dying_train_step(*args, **kwargs):
  step_fn = _make_train_step(*args, **kwargs)
  def dying_step(state, *rest):
    if jax.process_index() == 1 and int(state.step) == 2:
      os.kill(os.getpid(), signal.SIGKILL)
    return step_fn(state, *rest)
  return dying_step
_train.make_train_step = _make_dying_train_step
'''


def test_a_killed_process_stops_the_other_with_a_clear_error(data_dir, tmp_path):
  results = _train_processes(workdir=tmp_path, prelude=_DIE_AT_STEP_3,
                             heartbeat=KILLED_HEARTBEAT_TIMEOUT, num_train_steps=6,
                             **{'dataset.data_dir': data_dir})
  survivor, killed = results
  assert killed.returncode == -9, killed
  assert survivor.returncode not in (0, None), survivor  # None: still running at the timeout
  assert re.search(r'PeerProcessError: process 0 of 2 lost a peer while training: another '
                   r'process of this run stopped', survivor.stderr), survivor.stderr[-5000:]
  # jax's coordination service names the dead process when it stops the survivor.
  assert 'Task 1 heartbeat timeout' in survivor.stderr, survivor.stderr[-5000:]
  stopped_after = survivor.seconds - killed.seconds
  assert stopped_after < 2 * KILLED_HEARTBEAT_TIMEOUT + 30, stopped_after


# The command line of test_two_processes_dissect_like_one: the tiny config file variant, made to
# match test_train.tiny_config's model (the checkpoints of `straight_run`).
_DISSECT_FLAGS = ('--config=configs/shapes.py:cgl,tiny', '--mode=dissect',
                  '--config.model.kwargs.widths=(4, 6)', '--config.dataset.image_size=32',
                  '--config.cgl.num_groups=2')

# One process of a run of cgl_jax.main. Process 1 must not write the report (its
# fileio.atomic_directory raises), and must return only once process 0 has written it.
_MAIN_PROCESS = '''
import os, sys
from absl import app
from cgl_jax import fileio, main
if {process_id} == 1:
  def _no_writing(*args, **kwargs):
    raise AssertionError('process 1 wrote ' + str(args))
  fileio.atomic_directory = _no_writing
_run = main.run
def _run_then_look(config, workdir, **kwargs):
  _run(config, workdir, **kwargs)
  print('report complete on return:', os.path.exists(os.path.join(workdir, {summary!r})))
main.run = _run_then_look
sys.argv = ['cgl_jax.main', *{flags!r}]
app.run(main.main)
'''


def _report_files(directory):
  """{relative path: contents} of a dissection report, without what differs between runs of
  the same dissection (the wall time; matplotlib's SVG ids and dates)."""
  files = {}
  for path in sorted(directory.rglob('*')):
    relative = str(path.relative_to(directory))
    if path.is_dir() or path.suffix == '.svg':
      continue
    if path.suffix == '.json':
      payload = json.loads(path.read_text())
      payload.pop('seconds', None)
      files[relative] = payload
    else:
      files[relative] = path.read_bytes()
  return files


def test_two_processes_dissect_like_one(straight_run, data_dir, tmp_path):
  """`main --distributed --coordinator_address … --process_id i --mode=dissect` in 2 processes
  writes the report of one process (and process 0 alone writes it)."""
  flags = [*_DISSECT_FLAGS, f'--config.dataset.data_dir={data_dir}']
  two, one = tmp_path / 'two', tmp_path / 'one'
  for workdir in (two, one):
    shutil.copytree(straight_run, workdir)

  def process(process_id, coordinator):
    argv = [*flags, f'--workdir={two}', '--distributed', f'--coordinator_address={coordinator}',
            '--num_processes=2', f'--process_id={process_id}',
            f'--heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT}']
    return ['-c', _MAIN_PROCESS.format(process_id=process_id, flags=argv,
                                       summary='dissect/step_6/summary.json')]

  results = run_processes(process, num_processes=2, timeout=TIMEOUT)
  for result in results:
    assert 'report complete on return: True' in result.stdout, result

  config = default_config.load_config_file(_DISSECT_FLAGS[0].split('=', 1)[1])
  config.model.kwargs.widths = (4, 6)
  config.dataset.image_size = 32
  config.cgl.num_groups = 2
  config.dataset.data_dir = data_dir
  dissect.run(config, str(one))
  two_files = _report_files(two / 'dissect' / 'step_6')
  assert 'conv2/tally.csv' in two_files and 'report.html' in two_files
  assert two_files == _report_files(one / 'dissect' / 'step_6')
  assert sorted(os.listdir(two / 'dissect')) == ['step_6']  # no staging or old copies left
