"""cgl_jax.fileio.atomic_directory: readers see the old directory or the complete new one."""
import os

import pytest

from cgl_jax import fileio


def _write(directory, name, text):
  with open(os.path.join(directory, name), 'w') as f:
    f.write(text)


def _contents(directory):
  return {name: open(os.path.join(directory, name)).read() for name in os.listdir(directory)}


def test_creates_the_target_and_its_parent(tmp_path):
  target = tmp_path / 'a' / 'b'
  with fileio.atomic_directory(target) as staging:
    assert os.path.dirname(staging) == str(tmp_path / 'a')
    assert os.path.basename(staging).startswith('.b.tmp-')
    assert not target.exists()  # nothing visible until the block finishes
    _write(staging, 'x.txt', 'new')
  assert _contents(target) == {'x.txt': 'new'}
  assert os.listdir(tmp_path / 'a') == ['b']


def test_replaces_an_existing_target_whole(tmp_path):
  target = tmp_path / 'out'
  target.mkdir()
  _write(target, 'stale.txt', 'old')
  with fileio.atomic_directory(str(target)) as staging:
    _write(staging, 'fresh.txt', 'new')
  assert _contents(target) == {'fresh.txt': 'new'}
  assert os.listdir(tmp_path) == ['out']  # the old copy and the staging dir are gone


def test_failure_mid_write_keeps_the_old_target_and_leaves_no_staging_dir(tmp_path):
  target = tmp_path / 'out'
  target.mkdir()
  _write(target, 'stale.txt', 'old')
  with pytest.raises(OSError, match='disk full'):
    with fileio.atomic_directory(target) as staging:
      _write(staging, 'half.txt', 'partial')
      raise OSError('disk full')
  assert _contents(target) == {'stale.txt': 'old'}
  assert os.listdir(tmp_path) == ['out']


def test_interrupt_mid_write_leaves_no_target_and_no_staging_dir(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with fileio.atomic_directory(tmp_path / 'out') as staging:
      _write(staging, 'half.txt', 'partial')
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []


def test_without_overwrite_an_existing_target_is_an_error(tmp_path):
  target = tmp_path / 'out'
  target.mkdir()
  with pytest.raises(FileExistsError, match=f'{target} exists; pass overwrite=True'):
    with fileio.atomic_directory(target, overwrite=False):
      pytest.fail('the block must not run')


def test_without_overwrite_a_target_written_meanwhile_wins(tmp_path):
  """Another writer finishing first (e.g. a second process exporting the same data) keeps its
  directory; this writer gets FileExistsError and its staging dir is removed."""
  target = tmp_path / 'out'
  with pytest.raises(FileExistsError, match='created by someone else'):
    with fileio.atomic_directory(target, overwrite=False) as staging:
      _write(staging, 'mine.txt', 'mine')
      target.mkdir()
      _write(target, 'theirs.txt', 'theirs')
  assert _contents(target) == {'theirs.txt': 'theirs'}
  assert os.listdir(tmp_path) == ['out']
