"""Dissection outputs: tally.csv, JSON summaries, graphs, unit image strips and the HTML report.

`write_report(result, outdir, step=…, data=…)` writes everything a `results.DissectionResult`
holds; the numbers all come from the result, this module only formats them. The files go into a
staging folder that replaces `outdir` whole (`fileio.atomic_directory`): locally in one rename, so
a crash never leaves a half-written report; on object stores (gs://…) by an upload with
`summary.json` last, so a report with a `summary.json` is complete. Layout of `outdir`:

    report.html                    one self-contained page linking everything below
    summary.json                   per layer and IoU threshold: detectors, unique detectors (per
                                   category), per-concept counts; RUD; thresholds used
    concept_groups.csv/.png/.svg   per layer and group: dominant concept, its detectors, β_gl
    <layer>/tally.csv              NetDissect-Lite's columns (unit, category, label, score and
                                   per category <cat>-label/-truth/-activation/-intersect/-iou)
    <layer>/summary.json           the layer's thresholds T_k and detector statistics
    <layer>/detectors.png/.svg     detector units per concept, coloured by category
    <layer>/units/unit_NNNN.png    the unit's top images, region above T_k highlighted

Units are numbered from 1 in all outputs, as in NetDissect-Lite.
"""
from __future__ import annotations

import csv
import html
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from cgl_jax import fileio
from cgl_jax.data import broden as broden_lib
from cgl_jax.dissect import results as results_lib
from cgl_jax.dissect import tally as tally_lib

_CATEGORY_COLOURS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
                     '#7f7f7f', '#bcbd22', '#17becf')


def category_colour(index: int) -> str:
  return _CATEGORY_COLOURS[index % len(_CATEGORY_COLOURS)]


# ----------------------------------------------------------------------------------------------
# The report folder.


def write_report(result: results_lib.DissectionResult, outdir: str | os.PathLike, *, step: int,
                 data: broden_lib.Broden) -> str:
  """Writes every output of `result` into `outdir` (replaced whole); returns `outdir`.

  Args:
    result: from `results.compute`.
    outdir: the report folder, e.g. `workdir/dissect/step_<step>` (local or gs://…).
    step: the checkpoint step that was dissected (recorded in the summaries and titles).
    data: the probe set `result` was computed on (the unit strips show its images).
  """
  settings = result.settings
  with fileio.atomic_directory(outdir, commit_file='summary.json') as staging:
    layer_pages = {name: _write_layer(staging, layer, result, step=step, data=data)
                   for name, layer in result.layers.items()}
    summary = _step_summary(result, step=step,
                            layer_summaries={name: page['summary']
                                             for name, page in layer_pages.items()})
    group_rows = [row for layer in result.layers.values() for row in layer.groups]
    if group_rows:
      write_rows_csv(os.path.join(staging, 'concept_groups.csv'), group_rows, GROUP_COLUMNS)
      concept_group_bubbles(os.path.join(staging, 'concept_groups'), group_rows,
                            categories=result.categories,
                            title=f'Concept groups (G = {settings.num_groups}), step {step}')
      summary.update(concept_groups_csv='concept_groups.csv',
                     concept_groups_plot='concept_groups.png')
    write_json(os.path.join(staging, 'summary.json'), summary)
    quantile_method = ('exact' if settings.exact_quantile
                       else 'histogram, ≤ 2^-8 relative error')
    page = html_report(
        title=f'Network dissection, step {step}',
        meta=[f'Probe set: {result.probe_set} ({result.num_images} images, categories '
              f'{", ".join(result.categories)}).',
              f'Thresholds: top {settings.quantile:g} quantile per unit ({quantile_method}); '
              f'IoU thresholds {", ".join(f"{t:g}" for t in settings.iou_thresholds)}.',
              f'Measurement: {settings.measurement or "as called"}; maps upsampled '
              f'{settings.upsampling} (PIL).'],
        summary=summary, layers=layer_pages, categories=result.categories)
    with open(os.path.join(staging, 'report.html'), 'w') as f:
      f.write(page)
  return outdir


def _layer_summary(layer: results_lib.LayerResult, settings: results_lib.DissectionSettings, *,
                   step: int) -> dict[str, Any]:
  """`<layer>/summary.json`."""
  return {
      'step': step, 'layer': layer.name, 'num_units': layer.num_units,
      'map_size': list(layer.map_size), 'quantile': settings.quantile,
      'exact_quantile': settings.exact_quantile,
      'max_threshold_error': layer.max_threshold_error,
      'iou_thresholds': list(settings.iou_thresholds),
      'detectors': layer.detectors,
      'thresholds': [float(t) for t in layer.thresholds],
  }


def _step_summary(result: results_lib.DissectionResult, *, step: int,
                  layer_summaries: Mapping[str, Any]) -> dict[str, Any]:
  """`summary.json` (without the concept-group file links)."""
  settings = result.settings
  return {
      'step': step, 'probe_set': result.probe_set, 'num_images': result.num_images,
      'categories': list(result.categories), 'quantile': settings.quantile,
      'exact_quantile': settings.exact_quantile,
      'iou_thresholds': list(settings.iou_thresholds),
      'measurement': settings.measurement_record(result.categories),
      'layers': dict(layer_summaries),
      'rud': result.rud, 'seconds': round(result.seconds, 1),
  }


def _write_layer(staging: str, layer: results_lib.LayerResult,
                 result: results_lib.DissectionResult, *, step: int,
                 data: broden_lib.Broden) -> dict[str, Any]:
  """Writes `<layer>/…`; returns what the HTML page shows of the layer (see `html_report`)."""
  name, settings = layer.name, result.settings
  categories, label_names = result.categories, result.label_names
  os.makedirs(os.path.join(staging, name, 'units'))
  rows = tally_rows(layer.concepts, layer.counts, categories=categories, label_names=label_names)
  write_tally_csv(os.path.join(staging, name, 'tally.csv'), rows, categories)
  summary = _layer_summary(layer, settings, step=step)
  write_json(os.path.join(staging, name, 'summary.json'), summary)
  threshold = settings.iou_thresholds[0]
  detector_bar_graph(
      os.path.join(staging, name, 'detectors'), concepts=layer.concepts, threshold=threshold,
      categories=categories, label_names=label_names,
      title=f'{name}, step {step}: detectors per concept (IoU ≥ {threshold:g})')
  strips = _write_unit_strips(os.path.join(staging, name, 'units'), layer, data,
                              image_size=settings.image_size, upsampling=settings.upsampling)
  return {'summary': summary, 'tally': rows, 'groups': layer.groups,
          'files': {'tally': f'{name}/tally.csv', 'summary': f'{name}/summary.json',
                    'bar_graph': f'{name}/detectors.png',
                    'bar_graph_svg': f'{name}/detectors.svg',
                    'strips': {unit: f'{name}/units/{file}' for unit, file in strips.items()}}}


def _write_unit_strips(directory: str, layer: results_lib.LayerResult, data: broden_lib.Broden,
                       *, image_size: int, upsampling: str) -> dict[int, str]:
  """unit_NNNN.png per unit (1-based) with top images: each image with the region where the
  unit's map, upsampled with `upsampling`, exceeds T_k highlighted. Returns {unit: file name}."""
  rows = np.unique(layer.top_images[layer.top_images >= 0])
  images = {int(row): data.load_image(int(row), (image_size, image_size)) for row in rows}
  files = {}
  for unit in range(layer.num_units):
    chosen = [j for j, row in enumerate(layer.top_images[unit]) if row >= 0]
    if not chosen:
      continue
    strip = unit_strip([images[int(layer.top_images[unit, j])] for j in chosen],
                       [layer.top_maps[unit, j] for j in chosen], float(layer.thresholds[unit]),
                       upsampling=upsampling)
    files[unit + 1] = f'unit_{unit + 1:04d}.png'
    save_png(os.path.join(directory, files[unit + 1]), strip)
  return files


# ----------------------------------------------------------------------------------------------
# Files.


def write_json(path: str, payload) -> None:
  with open(path, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=False)
    f.write('\n')


# ----------------------------------------------------------------------------------------------
# tally.csv (NetDissect-Lite's columns and order).


def tally_rows(concepts: tally_lib.UnitConcepts, counts: tally_lib.TallyCounts, *,
               categories: Sequence[str], label_names: Sequence[str]) -> list[dict]:
  """One dict per unit, best score first; units numbered from 1 as in the reference.

  A category without a match (label 0) is written as the reference writes it: empty label,
  truth, intersection and IoU 0, and as activation the unit's count for label 0's primary
  category in the reference, the last one.
  """
  rows = []
  last = len(categories) - 1
  for unit in np.argsort(-concepts.score, kind='stable'):
    row = {'unit': int(unit) + 1, 'category': categories[concepts.category[unit]],
           'label': label_names[concepts.label[unit]], 'score': float(concepts.score[unit])}
    for g, category in enumerate(categories):
      label = concepts.category_label[unit, g]
      row.update({f'{category}-label': label_names[label] if label else '',
                  f'{category}-truth': int(counts.labels[label]) if label else 0,
                  f'{category}-activation': int(counts.units_cat[unit, g if label else last]),
                  f'{category}-intersect': int(counts.both[unit, label]) if label else 0,
                  f'{category}-iou': float(concepts.category_iou[unit, g])})
    rows.append(row)
  return rows


def tally_columns(categories: Sequence[str]) -> list[str]:
  return ['unit', 'category', 'label', 'score'] + [
      f'{c}-{field}' for c in categories
      for field in ('label', 'truth', 'activation', 'intersect', 'iou')]


def write_tally_csv(path: str, rows: Sequence[Mapping], categories: Sequence[str]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, tally_columns(categories), lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)


# ----------------------------------------------------------------------------------------------
# Graphs (matplotlib, Agg).


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def detector_bar_graph(stem: str, *, concepts: tally_lib.UnitConcepts, threshold: float,
                       categories: Sequence[str], label_names: Sequence[str],
                       title: str) -> None:
  """Bars: number of detector units per concept, coloured by category → stem.png/.svg."""
  plt = _pyplot()
  detector = concepts.is_detector(threshold)
  labels, counts = np.unique(concepts.label[detector], return_counts=True)
  category_of = {label: concepts.category[np.flatnonzero(concepts.label == label)[0]]
                 for label in labels}
  order = sorted(range(len(labels)), key=lambda i: (category_of[labels[i]], -counts[i]))
  fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(labels) + 1.5), 3.2))
  if len(labels):
    ax.bar(range(len(order)), [counts[i] for i in order],
           color=[category_colour(category_of[labels[i]]) for i in order])
    ax.set_xticks(range(len(order)), [label_names[labels[i]] for i in order], rotation=60,
                  ha='right', fontsize=8)
    ax.set_xlim(-0.75, max(len(order), 4) - 0.25)  # a lone bar stays bar-shaped
  else:
    ax.text(0.5, 0.5, f'no detectors at IoU ≥ {threshold:g}', ha='center', va='center',
            transform=ax.transAxes)
    ax.set_xticks([])
  ax.set_ylabel('detector units')
  ax.set_title(title, fontsize=9)
  # Explicit patches: an empty bar() gives a legend entry without the category's colour.
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  ax.legend(handles=[Patch(color=category_colour(g), label=category)
                     for g, category in enumerate(categories)],
            fontsize=7, frameon=False, loc='upper left', bbox_to_anchor=(1, 1))
  fig.tight_layout()
  for ext in ('png', 'svg'):  # 'tight' keeps the outside legend and a long title in the file
    fig.savefig(f'{stem}.{ext}', dpi=110, bbox_inches='tight')
  plt.close(fig)


GROUP_COLUMNS = ('layer', 'group', 'first_unit', 'last_unit', 'concept', 'category', 'detectors',
                 'units_with_label', 'mean_iou', 'relevance', 'relevance_share')


def write_rows_csv(path: str, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, list(columns), lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)


def concept_group_bubbles(stem: str, rows: Sequence[Mapping], *, categories: Sequence[str],
                          title: str) -> None:
  """Bubble plot: layers × groups; area ∝ group relevance β_gl (uniform if unknown), colour =
  category of the dominant concept, text = concept and its number of detector units."""
  plt = _pyplot()
  layers = list(dict.fromkeys(row['layer'] for row in rows))
  max_group = max((row['group'] for row in rows), default=1)
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * max_group + 1.5), 1.2 * len(layers) + 1.2))
  relevances = [row['relevance'] for row in rows if row['relevance'] != '']
  largest = max(relevances, default=0) or 1.0
  for row in rows:
    y = layers.index(row['layer'])
    share = row['relevance'] / largest if row['relevance'] != '' else 0.5
    ax.scatter(row['group'], y, s=60 + 1400 * share, alpha=0.55, edgecolors='k',
               color=category_colour(categories.index(row['category'])))
    ax.annotate(f"{row['concept']}\n×{row['detectors']}", (row['group'], y), fontsize=7,
                ha='center', va='center')
  ax.set_yticks(range(len(layers)), layers)
  ax.set_xticks(range(1, max_group + 1))
  ax.set_xlim(0.4, max_group + 0.6)
  ax.set_ylim(-0.6, len(layers) - 0.4)
  ax.set_xlabel('concept group (bubble area ∝ group relevance β)')
  ax.set_title(title, fontsize=10)
  for g, category in enumerate(categories):
    ax.scatter([], [], color=category_colour(g), label=category)
  ax.legend(fontsize=7, frameon=False, loc='upper left', bbox_to_anchor=(1, 1))
  fig.tight_layout()
  for ext in ('png', 'svg'):
    fig.savefig(f'{stem}.{ext}', dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Unit image strips (the paper's Fig. 5).


_PIL_FILTERS = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST, 'bicubic': Image.BICUBIC}


def highlight(image: np.ndarray, feature_map: np.ndarray, threshold: float, *,
              upsampling: str = 'bilinear', dim: float = 0.25) -> np.ndarray:
  """uint8 image with the region where the upsampled map exceeds `threshold` kept, the rest
  dimmed to `dim` and the region's border drawn in yellow.

  `upsampling` is the PIL filter ('bilinear' | 'nearest' | 'bicubic') that resizes the map to
  the image, as the dissection's tally resized it (`DissectionSettings.upsampling`).
  """
  if upsampling not in _PIL_FILTERS:
    raise ValueError(f'upsampling must be one of {tuple(_PIL_FILTERS)}; got {upsampling!r}')
  height, width = image.shape[:2]
  upsampled = np.asarray(Image.fromarray(np.asarray(feature_map, np.float32), mode='F').resize(
      (width, height), _PIL_FILTERS[upsampling]))
  mask = upsampled > threshold
  out = image.astype(np.float32) * np.where(mask, 1.0, dim)[..., None]
  inner = mask.copy()
  inner[1:] &= mask[:-1]
  inner[:-1] &= mask[1:]
  inner[:, 1:] &= mask[:, :-1]
  inner[:, :-1] &= mask[:, 1:]
  out[mask & ~inner] = (255, 220, 0)
  return out.astype(np.uint8)


def unit_strip(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], threshold: float, *,
               upsampling: str = 'bilinear', gap: int = 2) -> np.ndarray:
  """The unit's top images side by side, each highlighted (uint8 [S, k·S + (k−1)·gap, 3])."""
  tiles = [highlight(image, feature_map, threshold, upsampling=upsampling)
           for image, feature_map in zip(images, maps)]
  height, width = tiles[0].shape[:2]
  strip = np.full((height, len(tiles) * (width + gap) - gap, 3), 255, np.uint8)
  for i, tile in enumerate(tiles):
    strip[:, i * (width + gap):i * (width + gap) + width] = tile
  return strip


def save_png(path: str, array: np.ndarray) -> None:
  Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------------------------
# HTML.

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
     color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:18px 0 6px} p.meta{color:#555;margin:2px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:middle}
th{background:#f3f3f3} table.sortable th{cursor:pointer;user-select:none}
table.sortable th:hover{background:#e6eefc} th.asc:after{content:" \\25B2"} th.desc:after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
img.strip{height:48px;image-rendering:pixelated} img.graph{max-width:100%;border:1px solid #eee}
tr.detector td:first-child{font-weight:bold}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, column){
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var ascending = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
      th.classList.add(ascending ? 'asc' : 'desc');
      rows.sort(function(a, b){
        var x = a.cells[column].getAttribute('data-key'), y = b.cells[column].getAttribute('data-key');
        var nx = parseFloat(x), ny = parseFloat(y);
        var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(function(row){body.appendChild(row);});
    });
  });
});
"""


def _cell(value, *, key=None, raw_html: str | None = None) -> str:
  key = value if key is None else key
  numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  text = raw_html if raw_html is not None else html.escape(
      f'{value:.4f}' if isinstance(value, (float, np.floating)) else str(value))
  css = ' class="num"' if numeric else ''
  return f'<td{css} data-key="{html.escape(str(key))}">{text}</td>'


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, sortable: bool,
           row_classes: Sequence[str] | None = None) -> str:
  head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
  body = []
  for i, cells in enumerate(rows):
    css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ''
    body.append(f'<tr{css}>{"".join(cells)}</tr>')
  body = ''.join(body)
  css = ' class="sortable"' if sortable else ''
  return f'<table{css}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_report(*, title: str, meta: Sequence[str], summary: Mapping,
                layers: Mapping[str, Mapping], categories: Sequence[str]) -> str:
  """One self-contained page (inline CSS/JS, relative image links, no external URLs).

  `layers[name]` holds: 'summary' (layer JSON), 'tally' (rows), 'groups' (rows), 'files'
  (relative paths: bar graph, unit strips by unit number, groups plot).
  """
  swatch = lambda cat: (f'<span class="swatch" style="background:'
                        f'{category_colour(categories.index(cat))}"></span>' if cat in categories
                        else '')
  parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>',
           f'<h1>{html.escape(title)}</h1>']
  parts += [f'<p class="meta">{html.escape(line)}</p>' for line in meta]

  thresholds = summary['iou_thresholds']
  overview_columns = ['layer', 'units'] + [
      f'{name} (IoU≥{t:g})' for t in thresholds for name in ('detectors', 'unique')] + [
      f'unique {c} (IoU≥{thresholds[0]:g})' for c in categories]
  overview = []
  for name, layer in layers.items():
    s = layer['summary']
    cells = [_cell(name, raw_html=f'<a href="#layer-{html.escape(name)}">{html.escape(name)}</a>'),
             _cell(s['num_units'])]
    for entry in s['detectors']:
      cells += [_cell(entry['detectors']), _cell(entry['unique_detectors'])]
    cells += [_cell(s['detectors'][0]['unique_detectors_per_category'][c]) for c in categories]
    overview.append(cells)
  parts += ['<h2>Summary</h2>', _table(overview_columns, overview, sortable=True)]
  rud_rows = [[_cell(f'{entry["iou_threshold"]:g}'), _cell(', '.join(entry['layers'])),
               _cell(entry['unique_detectors']), _cell(entry['units']), _cell(entry['rud'])]
              for entry in summary['rud']]
  parts += ['<h3>Ratio of unique detectors (RUD)</h3>',
            _table(['IoU threshold', 'layers', 'unique detectors', 'units', 'RUD'], rud_rows,
                   sortable=False)]
  if summary.get('concept_groups_plot'):
    parts += ['<h3>Concept groups</h3>',
              f'<p class="meta">Table: <a href="{summary["concept_groups_csv"]}">'
              f'{summary["concept_groups_csv"]}</a></p>',
              f'<img class="graph" alt="concept groups" src="{summary["concept_groups_plot"]}">']

  for name, layer in layers.items():
    s, files = layer['summary'], layer['files']
    parts += [f'<h2 id="layer-{html.escape(name)}">Layer {html.escape(name)}</h2>',
              f'<p class="meta">{s["num_units"]} units, maps {s["map_size"][0]}×'
              f'{s["map_size"][1]}; files: <a href="{files["tally"]}">tally.csv</a>, '
              f'<a href="{files["summary"]}">summary.json</a>, '
              f'<a href="{files["bar_graph_svg"]}">bar graph (SVG)</a></p>',
              f'<img class="graph" alt="detectors per concept" src="{files["bar_graph"]}">']
    if layer['groups']:
      group_rows = [[_cell(r['group']), _cell(f'{r["first_unit"]}–{r["last_unit"]}',
                                              key=r['first_unit']),
                     _cell(r['concept'], raw_html=swatch(r['category']) + html.escape(r['concept'])),
                     _cell(r['category']), _cell(r['detectors']), _cell(r['units_with_label']),
                     _cell(r['mean_iou']), _cell(r['relevance'] if r['relevance'] != '' else '—',
                                                 key=r['relevance'] if r['relevance'] != '' else -1)]
                    for r in layer['groups']]
      parts += ['<h3>Concept groups</h3>',
                _table(['group', 'units', 'dominant concept', 'category', 'detectors',
                        'units with label', 'mean IoU', 'relevance β'], group_rows,
                       sortable=True)]
    detector_threshold = thresholds[0]
    unit_rows, classes = [], []
    for row in layer['tally']:
      unit = row['unit']
      strip = files['strips'].get(unit)
      image = (f'<img class="strip" loading="lazy" alt="unit {unit} top images" src="{strip}">'
               if strip else '')
      unit_rows.append([_cell(unit), _cell(row['label'], raw_html=swatch(row['category']) +
                                          html.escape(row['label'])),
                        _cell(row['category']), _cell(row['score']),
                        _cell(s['thresholds'][unit - 1]), _cell('', raw_html=image)])
      classes.append('detector' if row['score'] >= detector_threshold else '')
    parts += [f'<h3>Units (bold: detector at IoU ≥ {detector_threshold:g}; '
              'click a column to sort)</h3>',
              _table(['unit', 'label', 'category', 'IoU', 'threshold', 'top images'],
                     unit_rows, sortable=True, row_classes=classes)]
  parts += [f'<script>{_SCRIPT}</script></body></html>']
  return '\n'.join(parts)
