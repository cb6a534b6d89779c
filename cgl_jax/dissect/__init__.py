"""Network Dissection of cgl_jax models (Bau et al. 2017, NetDissect-Lite's rules).

    run(config, workdir, *, step=None)             dissect a checkpoint of `workdir` (default: the
                                                   latest) into workdir/dissect/step_<N>/
    compute(model, variables, data, settings)      dissect any model/variables on a `Broden` probe
                                                   set → DissectionResult (numbers only)
    write_report(result, outdir, step=…, data=…)   write a result's files (layout: report.py)

`DissectionSettings` (settings.py) says what to compute. The algorithm is in probe.py (passes),
quantile.py (thresholds) and tally.py (IoU, concept groups); results.py collects the numbers,
report.py formats them.
"""
from __future__ import annotations

import os

import ml_collections

from cgl_jax.data import broden as broden_lib
from cgl_jax.dissect import measurement
from cgl_jax.dissect.report import write_report
from cgl_jax.dissect.results import (DissectionResult, LayerResult, compute,
                                     ratio_of_unique_detectors)
from cgl_jax.dissect.settings import DissectionSettings

__all__ = ['DissectionResult', 'DissectionSettings', 'LayerResult', 'compute', 'probe_directory',
           'ratio_of_unique_detectors', 'run', 'write_report']


def probe_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The Broden directory to probe: `config.dissect.broden_dir`, or the shapes images of the
  measurement's probe split and image format (`measurement.resolve`), exported once (cached next
  to the data, or under workdir/dissect when data_dir is None)."""
  if config.dissect.broden_dir:
    return config.dissect.broden_dir
  name = config.dataset.name
  if not name.startswith('cgl_shapes'):
    raise ValueError(f'config.dissect.broden_dir is None and dataset {name!r} is not cgl_shapes: '
                     'point config.dissect.broden_dir at a Broden directory (e.g. broden1_227, '
                     'see NetDissect-Lite script/dlbroden.sh)')
  from cgl_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from cgl_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top  (imports tfds)
  builder_name = name.split('/', 1)[1] if '/' in name else shapes_tfds.CglShapes.DEFAULT_CONFIG_NAME
  builtin = {c.name: c for c in shapes_tfds.CglShapes.BUILDER_CONFIGS}
  if builder_name not in builtin:
    raise ValueError(f'config.dataset.name {name!r}: unknown cgl_shapes config '
                     f'{builder_name!r}; known: {sorted(builtin)}')
  kwargs = builtin[builder_name].generator_kwargs()
  chosen = measurement.resolve(config.dissect)
  root = config.dataset.data_dir or os.path.join(workdir, 'dissect')
  key = '_'.join(f'{k}{v}' for k, v in sorted(kwargs.items()))
  suffix = '' if chosen['image_format'] == 'png' else f'_jpeg{broden_lib.JPEG_QUALITY}'
  directory = os.path.join(root, 'broden', f'cgl_shapes_{chosen["probe_split"]}_{key}{suffix}')
  if not os.path.isdir(directory):
    try:
      shapes.export_broden(directory, split=chosen['probe_split'],
                           image_format=chosen['image_format'], **kwargs)
    except FileExistsError:  # another process exported it meanwhile (the write is atomic)
      pass
  return directory


CHECKPOINTS = ('latest', 'best')


def run(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None) -> str:
  """Dissects checkpoint `step` of `workdir` as `config.dissect` says; returns the output folder
  `workdir/dissect/step_<step>`.

  step None: `config.dissect.checkpoint` picks it, 'latest' or 'best' (the kept step of highest
  validation top-1, the earliest of ties: `checkpoints.best_step`).
  """
  from cgl_jax import checkpoints  # pylint: disable=g-import-not-at-top  (orbax)
  settings = DissectionSettings.from_config(config)
  which = config.dissect.get('checkpoint', 'latest')
  if which not in CHECKPOINTS:
    raise ValueError(f'config.dissect.checkpoint must be one of {CHECKPOINTS}; got {which!r}')
  if step is None and which == 'best':
    step = checkpoints.best_step(workdir)
    if step is None:
      raise FileNotFoundError(
          f"config.dissect.checkpoint='best', but no kept checkpoint in "
          f'{checkpoints.checkpoint_dir(workdir)} was saved with validation metrics; evaluate '
          "when checkpointing, or set config.dissect.checkpoint='latest'")
  model, variables, step = checkpoints.restore_model(config, workdir, step=step)
  data = broden_lib.Broden(probe_directory(config, workdir), categories=settings.categories)
  result = compute(model, variables, data, settings)
  return write_report(result, os.path.join(workdir, 'dissect', f'step_{step}'), step=step,
                      data=data)
