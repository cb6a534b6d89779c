r"""Command line: train a CGL model and/or dissect its checkpoints.

    python -m cgl_jax.main --config=configs/shapes.py --workdir=/tmp/shapes
    python -m cgl_jax.main --config=configs/places365_alexnet.py:cgl --workdir=DIR \
        --config.dataset.data_dir=/data/tfds
    python -m cgl_jax.main --config=configs/shapes.py --workdir=/tmp/shapes --mode=dissect

--mode: 'auto' (the default: train, then dissect when config.dissect.enabled), 'train',
'dissect' (dissect the workdir's latest checkpoint) or 'train_and_dissect' (always both). Re-running the same command resumes training from the latest checkpoint.

Multi-host (e.g. Cloud TPU pods, SLURM): pass --distributed (or set CGL_JAX_DISTRIBUTED=1);
`jax.distributed.initialize()` then discovers the cluster before any device is touched.
"""
import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cgl_jax import train

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
    'Call jax.distributed.initialize() first (multi-host runs).')
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
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  run(_CONFIG.value, _WORKDIR.value, mode=_MODE.value)


if __name__ == '__main__':
  app.run(main)
