"""Dissection outputs: tally.csv, JSON summaries, graphs, unit image strips and the HTML report.

Numbers only come in through `tally.UnitConcepts` / `tally.TallyCounts`; this module formats.
Everything is written into a staging folder that replaces the step folder in one rename, so a
crash never leaves a half-written report.
"""
from __future__ import annotations

import csv
import html
import json
import os
import shutil
import tempfile
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from cgl_jax.dissect import tally as tally_lib

_CATEGORY_COLOURS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
                     '#7f7f7f', '#bcbd22', '#17becf')


def category_colour(index: int) -> str:
  return _CATEGORY_COLOURS[index % len(_CATEGORY_COLOURS)]


# ----------------------------------------------------------------------------------------------
# Atomic folders and files.


def replace_directory(staging: str, directory: str) -> None:
  """Renames `staging` to `directory`, replacing an existing one (moved aside, then deleted)."""
  parent = os.path.dirname(os.path.abspath(directory))
  if os.path.exists(directory):
    trash = tempfile.mkdtemp(prefix=f'.{os.path.basename(directory)}.old-', dir=parent)
    os.rename(directory, os.path.join(trash, 'old'))
    os.rename(staging, directory)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    os.rename(staging, directory)


def write_json(path: str, payload) -> None:
  with open(path, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=False)
    f.write('\n')


# ----------------------------------------------------------------------------------------------
# tally.csv (NetDissect-Lite's columns and order).


def tally_rows(concepts: tally_lib.UnitConcepts, counts: tally_lib.TallyCounts, *,
               categories: Sequence[str], label_names: Sequence[str]) -> list[dict]:
  """One dict per unit, best score first; units numbered from 1 as in the reference."""
  rows = []
  for unit in np.argsort(-concepts.score, kind='stable'):
    row = {'unit': int(unit) + 1, 'category': categories[concepts.category[unit]],
           'label': label_names[concepts.label[unit]], 'score': float(concepts.score[unit])}
    for g, category in enumerate(categories):
      label = concepts.category_label[unit, g]
      row.update({f'{category}-label': label_names[label] if label else '',
                  f'{category}-truth': int(counts.labels[label]) if label else 0,
                  f'{category}-activation': int(counts.units_cat[unit, g]),
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


def concept_group_rows(concepts: tally_lib.UnitConcepts, *, layer: str, num_groups: int,
                       relevance: np.ndarray | None, threshold: float,
                       categories: Sequence[str], label_names: Sequence[str]) -> list[dict]:
  """The paper's concept groups (Fig. 4) of one layer.

  Group g holds units [g·f, (g+1)·f) with f = C // G (the remaining C − G·f units are free). Its
  dominant concept is the label most common among its detector units (IoU ≥ threshold; ties: the
  larger summed IoU), or among all its units when none detects anything; `detectors` counts the
  group's units detecting that concept. β_g = ‖W_g‖_F is the group relevance.
  """
  num_units = len(concepts.label)
  if not 1 <= num_groups <= num_units:
    raise ValueError(f'config.cgl.num_groups={num_groups} must be in 1..{num_units} '
                     f'(units of layer {layer!r})')
  size = num_units // num_groups
  detector = concepts.is_detector(threshold)
  total_relevance = float(np.sum(relevance)) if relevance is not None else None
  rows = []
  for g in range(num_groups):
    units = np.arange(g * size, (g + 1) * size)
    pool = units[detector[units]] if detector[units].any() else units
    labels = concepts.label[pool]
    candidates = np.unique(labels)
    dominant = max(candidates, key=lambda label: (np.sum(labels == label),
                                                  concepts.score[pool][labels == label].sum()))
    with_label = units[concepts.label[units] == dominant]
    rows.append({
        'layer': layer, 'group': g + 1, 'first_unit': int(units[0]) + 1,
        'last_unit': int(units[-1]) + 1, 'concept': label_names[dominant],
        'category': categories[concepts.category[with_label[0]]],
        'detectors': int(np.sum(detector[with_label])),
        'units_with_label': int(len(with_label)),
        'mean_iou': float(concepts.score[with_label].mean()),
        'relevance': float(relevance[g]) if relevance is not None else '',
        'relevance_share': (float(relevance[g]) / total_relevance
                            if relevance is not None and total_relevance else ''),
    })
  return rows


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


def highlight(image: np.ndarray, feature_map: np.ndarray, threshold: float, *,
              dim: float = 0.25) -> np.ndarray:
  """uint8 image with the region where the bilinearly upsampled map exceeds `threshold` kept,
  the rest dimmed to `dim` and the region's border drawn in yellow."""
  height, width = image.shape[:2]
  upsampled = np.asarray(Image.fromarray(np.asarray(feature_map, np.float32), mode='F').resize(
      (width, height), Image.BILINEAR))
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
               gap: int = 2) -> np.ndarray:
  """The unit's top images side by side, each highlighted (uint8 [S, k·S + (k−1)·gap, 3])."""
  tiles = [highlight(image, feature_map, threshold) for image, feature_map in zip(images, maps)]
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
