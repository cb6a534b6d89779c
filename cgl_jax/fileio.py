"""Paths on any file system tfds and orbax support, and directories readers never see half-written.

Workdirs and data dirs may be local ('/data/run', 'run') or remote ('gs://bucket/run' on Cloud
TPU). `as_path` makes them `etils.epath` paths (what tfds and orbax use); `os.path` only knows
local files, and `os.path.abspath('gs://b/run')` is the local './gs:/b/run', where files would
silently stay on the VM's disk.

`atomic_directory` writes a directory whole. What "atomic" means depends on the file system:
- Local (POSIX) file systems: the directory is written into a hidden sibling and renamed into
  place; readers see the old directory or the complete new one (between the two renames of a
  replacement the target is briefly absent).
- Object stores (gs://…): there is no directory rename (a "rename" copies every object). The
  directory is written to a local temporary directory first and then uploaded file by file,
  `commit_file` last: a reader that checks for `commit_file` (e.g. a Broden `index.csv`, a
  report's `summary.json`) sees either no directory or a complete one. A replaced directory loses
  its `commit_file` first, then its other files. A writer that dies mid-upload leaves a target
  without `commit_file`, which the next write replaces.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """True for URIs ('gs://…', 's3://…'), False for local paths."""
  return '://' in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: local paths made absolute, URIs ('gs://…') kept as they are."""
  text = os.fspath(path)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = True,
                     commit_file: str | None = None) -> Iterator[str]:
  """Yields an empty local staging directory whose contents become `target` on success.

  Write everything into the yielded (always local) path. When the block finishes, the staging
  directory replaces `target`: locally by a rename, on object stores by an upload with
  `commit_file` last (see the module docstring for the guarantee of each). When the block raises,
  the staging directory is deleted and `target` is left as it was. A local staging directory is
  a hidden sibling (`.<name>.tmp-…`), so the rename stays on one file system.

  Args:
    target: the directory to create or replace (local path or URI); its parent is created if
      needed.
    overwrite: False: an existing `target` (also one that appeared while the block ran, e.g.
      written by another process) raises FileExistsError and is left untouched.
    commit_file: for object stores, the file (relative to the directory) uploaded last; readers
      that wait for it never see a partial directory. Ignored locally.

  Yields:
    The staging directory's path.
  """
  remote = is_remote(target)
  target = os.fspath(as_path(target))
  if not overwrite and epath.Path(target).exists():
    raise FileExistsError(f'{target} exists; pass overwrite=True to replace it')
  if remote:
    staging = tempfile.mkdtemp(prefix='cgl_jax-upload-')
  else:
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)
  try:
    yield staging
    if remote:
      _upload(staging, epath.Path(target), overwrite=overwrite, commit_file=commit_file)
    else:
      _swap_in(staging, target, overwrite=overwrite)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: str, target: str, *, overwrite: bool) -> None:
  """Renames `staging` to `target`; an existing `target` is moved aside first, then deleted."""
  if not os.path.exists(target):
    try:
      os.rename(staging, target)
    except OSError as error:  # `target` appeared meanwhile and is not an empty directory
      if os.path.exists(target):
        raise FileExistsError(f'{target} was created by someone else while it was being '
                              'written') from error
      raise
    return
  if not overwrite:
    raise FileExistsError(f'{target} was created by someone else while it was being written')
  parent, name = os.path.split(target)
  trash = tempfile.mkdtemp(prefix=f'.{name}.old-', dir=parent)
  old = os.path.join(trash, 'old')
  os.rename(target, old)
  try:
    os.rename(staging, target)
  except BaseException:
    os.rename(old, target)
    os.rmdir(trash)
    raise
  shutil.rmtree(trash, ignore_errors=True)


def _upload(staging: str, target: epath.Path, *, overwrite: bool,
            commit_file: str | None) -> None:
  """Copies the files under `staging` to `target`, `commit_file` last (object stores)."""
  if target.exists():
    if not overwrite:
      raise FileExistsError(f'{target} was created by someone else while it was being written')
    if commit_file and (target / commit_file).exists():
      (target / commit_file).unlink()
    target.rmtree()
  files = sorted(os.path.relpath(os.path.join(directory, name), staging)
                 for directory, _, names in os.walk(staging) for name in names)
  if commit_file:
    if commit_file not in files:
      raise FileNotFoundError(f'commit_file {commit_file!r} was not written into {target}')
    files.remove(commit_file)
    files.append(commit_file)
  for relative in files:
    destination = target / relative
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(epath.Path(staging, relative).read_bytes())
