"""Network Dissection of cgl_jax models (Bau et al. 2017, NetDissect-Lite's rules).

    run(config, workdir, *, step=None)   dissect a checkpoint of `workdir` (default: the latest)
    dissect(model, variables, data, …)   dissect any model/variables on a `Broden` probe set

Outputs, in ``workdir/dissect/step_<N>/`` (written into a staging folder, then renamed):

    report.html                    one self-contained page linking everything below
    summary.json                   per layer and IoU threshold: detectors, unique detectors (per
                                   category), per-concept counts; RUD; thresholds used
    concept_groups.csv/.png/.svg   per layer and group: dominant concept, its detectors, β_gl
    <layer>/tally.csv              NetDissect-Lite's columns (unit, category, label, score and
                                   per category <cat>-label/-truth/-activation/-intersect/-iou)
    <layer>/summary.json           the layer's thresholds T_k and detector statistics
    <layer>/detectors.png/.svg     detector units per concept, coloured by category
    <layer>/units/unit_NNNN.png    the unit's top images, region above T_k highlighted

Units are numbered from 1 in all outputs, as in the reference. The algorithm is in probe.py
(passes), quantile.py (thresholds) and tally.py (IoU); see ../shared/spec/dissection.md.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

import jax
import numpy as np

from cgl_jax.data import broden as broden_lib
from cgl_jax.dissect import measurement as measurement_lib
from cgl_jax.dissect import probe
from cgl_jax.dissect import report
from cgl_jax.dissect import tally as tally_lib

__all__ = ['dissect', 'probe_directory', 'run']


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
  chosen = measurement_lib.resolve(config.dissect)
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


def run(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None) -> str:
  """Dissects checkpoint `step` (None: the latest) of `workdir`; returns the output folder."""
  from cgl_jax import checkpoints  # pylint: disable=g-import-not-at-top  (orbax)
  from cgl_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (tensorflow)
  model, variables, step = checkpoints.restore_model(config, workdir, step=step)
  chosen = measurement_lib.resolve(config.dissect)
  data = broden_lib.Broden(probe_directory(config, workdir), categories=chosen['categories'])
  mean, std = input_pipeline.normalization(config.dataset)
  settings = config.dissect
  return dissect(
      model, variables, data, outdir=os.path.join(workdir, 'dissect', f'step_{step}'),
      step=step, layers=tuple(settings.layers), mean=mean, std=std,
      quantile=settings.quantile, iou_thresholds=tuple(chosen['iou_thresholds']),
      batch_size=settings.batch_size,
      image_size=settings.image_size or config.dataset.image_size,
      top_images=settings.top_images, num_groups=config.cgl.num_groups,
      exact_quantile=settings.get('exact_quantile', True), upsampling=chosen['upsampling'],
      measurement=chosen)


def _check_settings(*, layers, iou_thresholds, batch_size, top_images, image_size):
  if not layers:
    raise ValueError('config.dissect.layers is empty: name the conv layers to dissect')
  if not iou_thresholds or any(not 0 < t <= 1 for t in iou_thresholds):
    raise ValueError(f'config.dissect.iou_thresholds must be non-empty values in (0, 1]; got '
                     f'{tuple(iou_thresholds)}')
  for key, value in (('batch_size', batch_size), ('top_images', top_images),
                     ('image_size', image_size)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'config.dissect.{key} must be a positive integer, got {value!r}')


def dissect(model, variables, data: broden_lib.Broden, *, outdir: str, step: int,
            layers: Sequence[str], mean, std, quantile: float = 0.005,
            iou_thresholds: Sequence[float] = (0.04,), batch_size: int = 64,
            image_size: int = 64, top_images: int = 10, num_groups: int | None = None,
            exact_quantile: bool = True, upsampling: str = 'bilinear',
            measurement: dict | None = None, show_progress: bool = True) -> str:
  """Dissects `layers` of a model on `data` and writes the outputs to `outdir` (replaced).

  The first IoU threshold defines detectors (bar graph, concept groups, HTML highlighting);
  statistics are reported at all of them. `num_groups` (config.cgl.num_groups) sets the concept
  groups; None skips them. `upsampling`: PIL's filter for the maps ('bilinear' | 'nearest' |
  'bicubic'). summary.json records the measurement: `measurement` (`measurement.resolve`'s
  dict) with the values used here. Returns `outdir`.
  """
  _check_settings(layers=layers, iou_thresholds=iou_thresholds, batch_size=batch_size,
                  top_images=top_images, image_size=image_size)
  start = time.perf_counter()
  order = [layer.name for layer in model.conv_layers()]
  layers = sorted(dict.fromkeys(layers), key=lambda name: order.index(name) if name in order
                  else len(order))
  results = probe.dissect_layers(
      model, variables, data, layers=layers, mean=mean, std=std, quantile=quantile,
      batch_size=batch_size, image_size=image_size, top_images=top_images,
      exact_quantile=exact_quantile, upsampling=upsampling, show_progress=show_progress)
  categories = data.categories
  label_names = data.label_names()
  primary = data.primary_category_index(categories)
  forward = probe.make_forward(model, layers=layers, mean=mean, std=std)
  conv = {layer.name: layer for layer in model.conv_layers()}

  parent = os.path.dirname(os.path.abspath(outdir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(outdir)}.tmp-', dir=parent)
  try:
    layer_pages, layer_summaries, group_rows = {}, {}, []
    for name in layers:
      result = results[name]
      concepts = tally_lib.unit_concepts(tally_lib.iou(result.counts, primary), primary,
                                         len(categories))
      os.makedirs(os.path.join(staging, name, 'units'))
      rows = report.tally_rows(concepts, result.counts, categories=categories,
                               label_names=label_names)
      report.write_tally_csv(os.path.join(staging, name, 'tally.csv'), rows, categories)
      summary = {
          'step': step, 'layer': name, 'num_units': len(result.thresholds),
          'map_size': list(result.map_size), 'quantile': quantile,
          'exact_quantile': exact_quantile,
          'max_threshold_error': float(np.max(result.threshold_error_bound)),
          'iou_thresholds': list(iou_thresholds),
          'detectors': [tally_lib.detector_summary(concepts, threshold=t, categories=categories,
                                                   label_names=label_names)
                        for t in iou_thresholds],
          'thresholds': [float(t) for t in result.thresholds],
      }
      report.write_json(os.path.join(staging, name, 'summary.json'), summary)
      report.detector_bar_graph(
          os.path.join(staging, name, 'detectors'), concepts=concepts,
          threshold=iou_thresholds[0], categories=categories, label_names=label_names,
          title=f'{name}, step {step}: detectors per concept (IoU ≥ {iou_thresholds[0]:g})')
      strips = _write_unit_strips(os.path.join(staging, name, 'units'), forward, variables,
                                  data, layer=name, result=result, image_size=image_size,
                                  batch_size=batch_size)
      if num_groups:
        kernel = _lookup(variables['params'], conv[name].kernel_path) if name in conv else None
        group_rows += report.concept_group_rows(
            concepts, layer=name, num_groups=num_groups,
            relevance=_group_relevance(kernel, num_groups), threshold=iou_thresholds[0],
            categories=categories, label_names=label_names)
      layer_summaries[name] = summary
      layer_pages[name] = {
          'summary': summary, 'tally': rows,
          'groups': [r for r in group_rows if r['layer'] == name],
          'files': {'tally': f'{name}/tally.csv', 'summary': f'{name}/summary.json',
                    'bar_graph': f'{name}/detectors.png',
                    'bar_graph_svg': f'{name}/detectors.svg',
                    'strips': {unit: f'{name}/units/{file}' for unit, file in strips.items()}}}

    step_summary = {
        'step': step, 'probe_set': data.directory, 'num_images': len(data),
        'categories': list(categories), 'quantile': quantile, 'exact_quantile': exact_quantile,
        'measurement': {**(measurement or {}), 'upsampling': upsampling,
                        'iou_thresholds': list(iou_thresholds), 'categories': list(categories)},
        'iou_thresholds': list(iou_thresholds), 'layers': layer_summaries,
        'rud': [rud(layer_summaries, threshold_index=i, layers=layers)
                for i in range(len(iou_thresholds))],
        'seconds': round(time.perf_counter() - start, 1),
    }
    if group_rows:
      report.write_rows_csv(os.path.join(staging, 'concept_groups.csv'), group_rows,
                            report.GROUP_COLUMNS)
      report.concept_group_bubbles(os.path.join(staging, 'concept_groups'), group_rows,
                                   categories=categories,
                                   title=f'Concept groups (G = {num_groups}), step {step}')
      step_summary.update(concept_groups_csv='concept_groups.csv',
                          concept_groups_plot='concept_groups.png')
    report.write_json(os.path.join(staging, 'summary.json'), step_summary)
    page = report.html_report(
        title=f'Network dissection, step {step}',
        meta=[f'Probe set: {data.directory} ({len(data)} images, categories '
              f'{", ".join(categories)}).',
              f'Thresholds: top {quantile:g} quantile per unit '
              f'({"exact" if exact_quantile else "histogram, ≤ 2^-8 relative error"}); '
              f'IoU thresholds {", ".join(f"{t:g}" for t in iou_thresholds)}.'],
        summary=step_summary, layers=layer_pages, categories=categories)
    with open(os.path.join(staging, 'report.html'), 'w') as f:
      f.write(page)
    report.replace_directory(staging, outdir)
  except BaseException:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return outdir


def rud(layer_summaries, *, threshold_index: int, layers: Sequence[str]) -> dict:
  """Ratio of unique detectors over the last two probed layers (in forward order):
  Σ unique detectors / Σ units."""
  last = list(layers)[-2:]
  unique = sum(layer_summaries[n]['detectors'][threshold_index]['unique_detectors'] for n in last)
  units = sum(layer_summaries[n]['num_units'] for n in last)
  threshold = layer_summaries[last[0]]['detectors'][threshold_index]['iou_threshold']
  return {'iou_threshold': threshold, 'layers': last, 'unique_detectors': unique,
          'units': units, 'rud': unique / units}


def _lookup(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _group_relevance(kernel, num_groups: int):
  """β_gl = ‖W_g‖_F of each group (cgl_jax.losses.group_relevance), None without a kernel."""
  if kernel is None:
    return None
  from cgl_jax import losses  # pylint: disable=g-import-not-at-top
  return np.asarray(losses.group_relevance(jax.numpy.asarray(kernel), num_groups))


def _write_unit_strips(directory, forward, variables, data, *, layer, result, image_size,
                       batch_size) -> dict[int, str]:
  """unit_NNNN.png per unit (1-based): its top images with the region above T_k highlighted."""
  images, rows, maps = probe.top_image_maps(forward, variables, data, layer=layer,
                                            top_indices=result.top_indices,
                                            image_size=image_size, batch_size=batch_size)
  position = {row: i for i, row in enumerate(rows)}
  files = {}
  for unit in range(len(result.thresholds)):
    chosen = [j for j, row in enumerate(result.top_indices[unit]) if row >= 0]
    if not chosen:
      continue
    strip = report.unit_strip([images[position[result.top_indices[unit, j]]] for j in chosen],
                              [maps[unit, j] for j in chosen], float(result.thresholds[unit]))
    files[unit + 1] = f'unit_{unit + 1:04d}.png'
    report.save_png(os.path.join(directory, files[unit + 1]), strip)
  return files
