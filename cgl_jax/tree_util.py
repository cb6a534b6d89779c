"""Reading a nested mapping (params, batch_stats) by a path of keys."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def lookup(tree: Mapping[str, Any], path: Sequence[str], *, what: str) -> Any:
  """``tree[path[0]][path[1]]…``.

  Args:
    tree: nested mappings, e.g. a model's ``variables['params']``.
    path: the keys from the root, e.g. ``('conv1', 'Conv_0', 'kernel')``.
    what: names the tree in the error, e.g. ``'params'``.

  Raises:
    KeyError: naming the tree, the whole path and the first missing key.
  """
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f'{what}: no entry {"/".join(path)!r} (missing {key!r})')
    node = node[key]
  return node
