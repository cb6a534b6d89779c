"""Writing a directory so that readers never see it half-written."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
  """Yields an empty staging directory beside `target` that replaces `target` on success.

  Write everything into the yielded path. When the block finishes, the staging directory is
  renamed to `target`; an existing `target` is first moved aside and deleted after the rename.
  When the block raises, the staging directory is deleted and `target` is left as it was. Readers
  see the old directory or the complete new one, never a partial one (between the two renames
  `target` is briefly absent). The staging directory is a hidden sibling
  (`.<name>.tmp-…`), so both are on one file system and the rename is atomic.

  Args:
    target: the directory to create or replace; its parent is created if needed.
    overwrite: False: an existing `target` (also one that appeared while the block ran, e.g.
      written by another process) raises FileExistsError and is left untouched.

  Yields:
    The staging directory's path.
  """
  target = os.path.abspath(os.fspath(target))
  if not overwrite and os.path.exists(target):
    raise FileExistsError(f'{target} exists; pass overwrite=True to replace it')
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)
  try:
    yield staging
    _swap_in(staging, target, overwrite=overwrite)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


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
