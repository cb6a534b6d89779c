"""Looking up nested entries of a variables / params tree by key path."""
from collections.abc import Mapping, Sequence
from typing import Any


def lookup(tree: Mapping[str, Any], path: Sequence[str], *, what: str) -> Any:
  """`tree[path[0]][path[1]]…`; KeyError naming `what`, the path and the missing key."""
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f'{what}: no entry {"/".join(path)!r} (missing {key!r})')
    node = node[key]
  return node
