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

import tempfile
from unittest import mock

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import gpath

import test_dissect
from cgl_jax import checkpoints, default_config, dissect, fileio
from cgl_jax.data import broden
from test_dissect import computed  # pylint: disable=unused-import  (fixture)

BUCKET = 'gs://bucket'


@contextlib.contextmanager
def fake_gcs(root, *, fail_at_write: int | None = None):
  """'gs://bucket/…' ↔ `root`/… for every epath operation while active.

  Yields the list of remote files opened for writing, in order. `fail_at_write=k`: the k-th
  (0-based) such open raises OSError, as a lost connection would.
  """
  writes = []

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

  def open_(fn, path, mode, *args, **kwargs):
    if os.fspath(path).startswith(BUCKET) and any(c in mode for c in 'wa'):
      if len(writes) == fail_at_write:
        raise OSError(f'connection lost while writing {path}')
      writes.append(os.fspath(path)[len(BUCKET) + 1:])
    return fn(to_local(path), mode, *args, **kwargs)

  def glob(fn, pattern):
    return [to_remote(path) for path in fn(to_local(pattern))]

  def walk(fn, top, **kwargs):
    for directory, dirs, files in fn(to_local(top), **kwargs):
      yield to_remote(directory), dirs, files

  names = ('copy', 'exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'remove', 'rename',
           'replace', 'rmtree', 'stat')
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, past the mockable backends.
  with mock.patch.object(gpath, '_is_tf_installed', lambda: False), epath.testing.mock_epath(
      glob=glob, walk=walk, open=open_, **{name: mapped for name in names}):
    yield writes


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


def _tree(directory):
  return {str(path.relative_to(directory)): path.read_bytes()
          for path in sorted(directory.rglob('*')) if path.is_file()}


def _read_all(probe_set):
  (batch,) = probe_set.batches(batch_size=len(probe_set), num_threads=1)
  return batch


def test_broden_export_to_a_bucket_uploads_index_last_and_reads_back(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  local = broden.Broden(test_dissect.make_probe_set(str(tmp_path / 'local')))
  with fake_gcs(tmp_path / 'bucket') as writes:
    directory = test_dissect.make_probe_set(f'{BUCKET}/probe')
    remote = broden.Broden(directory)
    remote_batch = _read_all(remote)
  assert directory == f'{BUCKET}/probe' and remote.directory == f'{BUCKET}/probe'
  assert _tree(tmp_path / 'bucket' / 'probe') == _tree(tmp_path / 'local')
  assert writes[-1] == 'probe/index.csv' and len(writes) == len(_tree(tmp_path / 'local'))
  local_batch = _read_all(local)
  assert sorted(remote_batch) == sorted(local_batch)
  for key, value in local_batch.items():
    if isinstance(value, dict):
      assert sorted(remote_batch[key]) == sorted(value), key
      for name in value:
        np.testing.assert_array_equal(remote_batch[key][name], value[name], err_msg=key)
    else:
      np.testing.assert_array_equal(remote_batch[key], value, err_msg=key)
  assert not os.path.exists(tmp_path / 'gs:')  # nothing went to a local './gs:/…'


def test_an_interrupted_upload_leaves_no_index_and_the_next_write_replaces_it(tmp_path,
                                                                             monkeypatch):
  staging_root = tmp_path / 'tmp'
  staging_root.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(staging_root))
  target = f'{BUCKET}/probe'
  with fake_gcs(tmp_path / 'bucket', fail_at_write=3):
    with pytest.raises(OSError, match='connection lost'):
      test_dissect.make_probe_set(target)
  assert not (tmp_path / 'bucket' / 'probe' / 'index.csv').exists()
  assert (tmp_path / 'bucket' / 'probe').is_dir()  # a partial upload, without its index
  assert not any(staging_root.iterdir())  # the local staging copy is gone
  with fake_gcs(tmp_path / 'bucket'):
    with pytest.raises(FileNotFoundError, match='Broden file missing: gs://bucket/probe/'):
      broden.Broden(target)
    with pytest.raises(FileExistsError, match='gs://bucket/probe exists'):
      test_dissect.make_probe_set(target)  # overwrite=False
    broden.write_broden(target, images=np.zeros((2, 4, 4, 3), np.uint8),
                        concepts=[('red', 'colour')],
                        pixel_labels={'colour': np.ones((2, 4, 4), np.int32)}, overwrite=True)
    assert len(broden.Broden(target)) == 2
  assert not any(staging_root.iterdir())


def test_dissection_report_in_a_bucket_equals_the_local_one(computed, tmp_path):
  data, result, _ = computed
  dissect.write_report(result, str(tmp_path / 'local'), step=7, data=data)
  with fake_gcs(tmp_path / 'bucket') as writes:
    outdir = dissect.write_report(result, f'{BUCKET}/run/dissect/step_7', step=7, data=data)
  assert outdir == f'{BUCKET}/run/dissect/step_7'
  assert writes[-1] == 'run/dissect/step_7/summary.json'
  local, remote = _tree(tmp_path / 'local'), _tree(tmp_path / 'bucket' / 'run' / 'dissect' /
                                                   'step_7')
  assert sorted(local) == sorted(remote)
  assert local['conv1/tally.csv'] == remote['conv1/tally.csv']


def test_the_shapes_probe_set_is_exported_next_to_remote_data(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = default_config.get_config()
  config.dataset.name = 'cgl_shapes/binary_tiny'
  config.dataset.data_dir = f'{BUCKET}/tfds'
  with fake_gcs(tmp_path / 'bucket'):
    directory = dissect.probe_directory(config, f'{BUCKET}/run')
    assert directory.startswith(f'{BUCKET}/tfds/broden/cgl_shapes_validation_')
    assert len(broden.Broden(directory)) == 90
    assert dissect.probe_directory(config, f'{BUCKET}/run') == directory  # found, not redone
  assert (tmp_path / 'bucket' / directory[len(BUCKET) + 1:] / 'index.csv').is_file()
  assert not os.path.exists(tmp_path / 'gs:')
