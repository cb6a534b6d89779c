"""Paths of workdirs and data dirs on any file system that tfds and orbax support.

Workdirs and data dirs may be local ('/data/run', 'run') or remote ('gs://bucket/run' on Cloud
TPU). Everything that touches them goes through `etils.epath` (which tfds and orbax use too),
never through `os.path`/`open`/`tempfile`, which only know local files.
"""
from __future__ import annotations

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: local paths made absolute, URIs ('gs://…') kept as they are.

  (`os.path.abspath('gs://b/run')` is the local './gs:/b/run': files written there would
  silently stay on the VM's disk.)
  """
  text = os.fspath(path)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))
