"""Workdirs on remote file systems (gs://…) stay remote: a fake `gs://bucket` mapped to a temp dir.

`fake_gcs` re-roots every `etils.epath` call on a 'gs://bucket/…' path (the layer that tfds,
orbax and cgl_jax use for files) to a local directory. Code that turned the URI into a local path
(os.path.abspath('gs://b/x') is './gs:/b/x') or used `open`/`os` directly would miss the
files or write beside them; the tests check that everything lands under the fake bucket.
What the fake cannot show is an object store's semantics (a directory "rename" on GCS is a copy
then a delete): fileio's docstring says which guarantee holds where.
"""
import contextlib
import os

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cgl_jax import checkpoints, fileio

BUCKET = 'gs://bucket'


@contextlib.contextmanager
def fake_gcs(root):
  """'gs://bucket/…' ↔ `root`/… for every epath operation while active."""

  def to_local(value):
    if isinstance(value, os.PathLike):
      value = os.fspath(value)
    if isinstance(value, str) and value.startswith(BUCKET):
      return str(root) + value[len(BUCKET):]
    return value

  def to_remote(value):
    return BUCKET + value[len(str(root)):] if value.startswith(str(root)) else value

  def mapped(fn, *args, **kwargs):
    return fn(*(to_local(arg) for arg in args), **kwargs)

  def glob(fn, pattern):
    return [to_remote(path) for path in fn(to_local(pattern))]

  def walk(fn, top, **kwargs):
    for directory, dirs, files in fn(to_local(top), **kwargs):
      yield to_remote(directory), dirs, files

  names = ('copy', 'exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'open', 'remove', 'rename',
           'replace', 'rmtree', 'stat')
  with epath.testing.mock_epath(glob=glob, walk=walk, **{name: mapped for name in names}):
    yield


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(fileio.as_path('gs://bucket/run')) == 'gs://bucket/run'
  assert os.fspath(fileio.as_path('run')) == str(tmp_path / 'run')
  assert os.fspath(checkpoints.checkpoint_dir('gs://bucket/run')) == 'gs://bucket/run/checkpoints'


def test_orbax_gets_the_remote_checkpoint_directory(tmp_path, monkeypatch):
  """orbax reads and writes gs:// itself (through tensorstore, which a fake bucket cannot
  intercept), so what matters is that it is handed the URI, not a local path."""
  directories = []
  monkeypatch.setattr(ocp, 'CheckpointManager',
                      lambda directory, **kwargs: directories.append(directory))
  monkeypatch.chdir(tmp_path)
  checkpoints.create_manager('gs://bucket/run', read_only=True)
  checkpoints.create_manager('run')
  assert [os.fspath(d) for d in directories] == ['gs://bucket/run/checkpoints',
                                                 str(tmp_path / 'run' / 'checkpoints')]
