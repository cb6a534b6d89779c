"""Writing experiment results so that an interrupted run never leaves a half-written file.

Each file is written to a temporary file in the same directory and then renamed over the
target (`os.replace` is atomic on POSIX and Windows): a reader sees the old file or the new one.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` atomically, creating the parent directory if needed."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, payload: Any, *, indent: int = 2) -> None:
  """`payload` as JSON (plus a final newline) at `path`, written atomically."""
  write_text_atomic(path, json.dumps(payload, indent=indent) + '\n')
