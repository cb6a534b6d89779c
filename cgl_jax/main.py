r"""Command line: train a CGL model and/or dissect its checkpoints.

    python -m cgl_jax.main --config=configs/shapes.py --workdir=/tmp/shapes
    python -m cgl_jax.main --config=configs/places365_alexnet.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds
    python -m cgl_jax.main --config=configs/shapes.py --workdir=/tmp/shapes --mode=dissect

--mode: 'auto' (the default: train, then dissect when config.dissect.enabled), 'train',
'dissect' (dissect the workdir's latest checkpoint) or 'train_and_dissect' (always both). Re-running the same command resumes training from the latest checkpoint.

Multi-process (one process per host, e.g. Cloud TPU pods; see docs/tpu_pods.md): run the same
command on every host with --distributed (or CGL_JAX_DISTRIBUTED=1). On Cloud TPU, SLURM and
Open MPI the processes find each other; elsewhere name the coordinator (process 0's host and a
free port), the process count and each process's id:

    python -m cgl_jax.main --config=… --workdir=… --distributed \
        --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0   # on host 0
    python -m cgl_jax.main --config=… --workdir=… --distributed \
        --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1   # on host 1

The three also come from $JAX_COORDINATOR_ADDRESS (read by jax), $JAX_NUM_PROCESSES and
$JAX_PROCESS_ID. --heartbeat_timeout_seconds: how long a process may stay silent before it is
declared dead and the others stop (cgl_jax.distributed).
"""
import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cgl_jax import distributed, train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, optionally with a variant: configs/shapes.py:cgl.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries, reports.')
_MODE = flags.DEFINE_enum(
    'mode', 'auto', ['auto', 'train', 'dissect', 'train_and_dissect'],
    "'auto': train, then dissect if config.dissect.enabled; 'train'; 'dissect'; "
    "'train_and_dissect': both regardless of config.dissect.enabled.")
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', os.environ.get('CGL_JAX_DISTRIBUTED', '') == '1',
    'Join a multi-process run first (cgl_jax.distributed.initialize).')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None,
    "--distributed: process 0's host:port; default $JAX_COORDINATOR_ADDRESS, else detected.")
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None,
    '--distributed: number of processes; default $JAX_NUM_PROCESSES, else detected.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None,
    "--distributed: this process's id in [0, num_processes); default $JAX_PROCESS_ID, else "
    'detected.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', distributed.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
    '--distributed: a process silent this long is declared dead and the others stop.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str, *, mode: str) -> None:
  """Trains and/or dissects as `mode` says (see the module docstring)."""
  if mode in ('auto', 'train', 'train_and_dissect'):
    train.train_and_evaluate(config, workdir)
  if mode in ('dissect', 'train_and_dissect') or (mode == 'auto' and config.dissect.enabled):
    from cgl_jax import dissect  # pylint: disable=g-import-not-at-top  (not needed to train)
    dissect.run(config, workdir)


class _HideLibraryInfo(std_logging.Filter):
  """Drops INFO/DEBUG records logged from inside the named packages (orbax logs every file)."""

  def __init__(self, packages):
    super().__init__()
    self._markers = tuple(f'{os.sep}{package}{os.sep}' for package in packages)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        marker in record.pathname for marker in self._markers)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_HideLibraryInfo(('orbax',)))
  if _DISTRIBUTED.value:
    distributed.initialize(coordinator_address=_COORDINATOR_ADDRESS.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  elif any(flag.present for flag in (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID)):
    raise app.UsageError('--coordinator_address, --num_processes and --process_id need '
                         '--distributed')
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  run(_CONFIG.value, _WORKDIR.value, mode=_MODE.value)


if __name__ == '__main__':
  app.run(main)
