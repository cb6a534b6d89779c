"""Multi-process training on one machine: 2 JAX processes on localhost, as on 2 hosts of a pod.

Each run is `multiprocess_util.run_processes` (fresh processes, a free port, a timeout, no process
left behind) over test_train's subprocess template, on test_train's tiny ShapesCNN and its
`cgl_shapes/binary_tiny` data. The references are in-process runs with 1 process × 1 device:
2 processes × 1 device and 1 process × 2 devices must reach the same parameters, and a
checkpoint must resume under the other topology to the uninterrupted run's parameters.
"""
import re
import shutil

import numpy as np
import pytest

from cgl_jax import checkpoints, train
from multiprocess_util import run_processes
from test_train import (_SUBPROCESS_TRAIN, _assert_params_equal, _shapes, _subprocess_train,
                        data_dir, flat_params)  # pylint: disable=unused-import  (fixture)

TIMEOUT = 300  # seconds for one multi-process run (a tiny one takes ~30 s on 2 busy cores)
HEARTBEAT_TIMEOUT = 10  # seconds: a failed test stops soon instead of waiting 100 s
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # XLA may sum a batch in another order per topology

_JOIN = '''
from cgl_jax import distributed
distributed.initialize(heartbeat_timeout_seconds={heartbeat})
'''


def _train_processes(*, workdir, out, num_processes=2, prelude='', check=True, **overrides):
  """Trains test_train.tiny_config(**overrides) in `num_processes` processes.

  Returns (results, params): the processes' results, and process 0's final params (checked equal
  in every process) when all succeeded, else None.
  """
  program = _SUBPROCESS_TRAIN.format(
      prelude=_JOIN.format(heartbeat=HEARTBEAT_TIMEOUT) + prelude, overrides=overrides,
      workdir=str(workdir), out=str(out) + '.process{process}.npz')
  results = run_processes(program, num_processes=num_processes, timeout=TIMEOUT, check=check)
  if any(result.returncode != 0 for result in results):
    return results, None
  params = [dict(np.load(f'{out}.process{index}.npz')) for index in range(num_processes)]
  for other in params[1:]:
    _assert_params_equal(other, params[0])  # replicated: bitwise the same in every process
  return results, params[0]


def _max_difference(actual, expected):
  return max(float(np.max(np.abs(actual[name] - expected[name]))) for name in expected)


@pytest.fixture(scope='module')
def one_process(data_dir, tmp_path_factory):
  """1 process × 1 device: a 3-step workdir and the params after 3 and after 6 straight steps."""
  workdir = tmp_path_factory.mktemp('one_process_3')
  three = train.train_and_evaluate(_shapes(data_dir, num_train_steps=3), str(workdir))
  six = train.train_and_evaluate(_shapes(data_dir, num_train_steps=6),
                                 str(tmp_path_factory.mktemp('one_process_6')))
  return {'workdir': workdir, 'step3': flat_params(three.params),
          'step6': flat_params(six.params)}


@pytest.fixture(scope='module')
def two_processes(data_dir, tmp_path_factory):
  """2 processes × 1 device, 3 steps: the workdir and the final params."""
  workdir = tmp_path_factory.mktemp('two_processes_3')
  _, params = _train_processes(workdir=workdir, out=workdir / 'params', num_train_steps=3,
                               **{'dataset.data_dir': data_dir})
  assert checkpoints.available_steps(workdir) == [3]
  return {'workdir': workdir, 'step3': params}


def test_two_processes_and_two_devices_train_like_one_device(one_process, two_processes,
                                                             data_dir, tmp_path,
                                                             python_subprocess):
  two_devices = _subprocess_train(python_subprocess, workdir=tmp_path / 'two_devices',
                                  out=tmp_path / 'p.npz', num_devices=2, num_train_steps=3,
                                  **{'dataset.data_dir': data_dir})
  for name, params in (('1 process x 2 devices', two_devices),
                       ('2 processes x 1 device', two_processes['step3'])):
    print(f'{name} vs 1 x 1 after 3 steps: max |difference| '
          f'{_max_difference(params, one_process["step3"]):.3g}')
    _assert_params_equal(params, one_process['step3'], **TOLERANCE)


def test_checkpoints_resume_across_process_counts(one_process, two_processes, data_dir,
                                                  tmp_path):
  """Written by 2 processes → resumed by 1, and the other way round: both reach the params of
  6 uninterrupted steps in 1 process."""
  from_two = tmp_path / 'from_two'
  shutil.copytree(two_processes['workdir'], from_two)
  resumed_in_one = train.train_and_evaluate(_shapes(data_dir, num_train_steps=6), str(from_two))
  assert checkpoints.available_steps(from_two) == [3, 6]

  from_one = tmp_path / 'from_one'
  shutil.copytree(one_process['workdir'], from_one)
  _, resumed_in_two = _train_processes(workdir=from_one, out=tmp_path / 'params',
                                       num_train_steps=6, **{'dataset.data_dir': data_dir})
  assert checkpoints.available_steps(from_one) == [3, 6]
  for name, params in (('2 processes -> 1', flat_params(resumed_in_one.params)),
                       ('1 process -> 2', resumed_in_two)):
    print(f'resumed {name} vs 6 straight steps: max |difference| '
          f'{_max_difference(params, one_process["step6"]):.3g}')
    _assert_params_equal(params, one_process['step6'], **TOLERANCE)


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
  results, _ = _train_processes(workdir=tmp_path, out=tmp_path / 'params', check=False,
                                prelude=_DIE_AT_STEP_3, num_train_steps=6,
                                **{'dataset.data_dir': data_dir})
  survivor, killed = results
  assert killed.returncode == -9, killed
  assert survivor.returncode not in (0, None), survivor  # None: still running at the timeout
  assert re.search(r'PeerProcessError: process 0 of 2 lost a peer while training: another '
                   r'process of this run stopped', survivor.stderr), survivor.stderr[-5000:]
  # jax's coordination service names the dead process when it stops the survivor.
  assert 'Task 1 heartbeat timeout' in survivor.stderr, survivor.stderr[-5000:]
  assert survivor.seconds < killed.seconds + 2 * HEARTBEAT_TIMEOUT + 30, (survivor.seconds,
                                                                           killed.seconds)
