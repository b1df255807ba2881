"""Write a directory under a temporary name and rename it into place when complete.

A killed or failed job therefore leaves nothing where a finished result would be.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


class OutputExistsError(FileExistsError):
  pass


def _tmp_sibling(path: Path, tag: str) -> Path:
  return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_writable(out_dir, overwrite: bool = False) -> Path:
  """Fails before any work if the output exists and overwriting was not asked for."""
  out = Path(out_dir).absolute()
  if out.exists() and not overwrite:
    raise OutputExistsError(f"output {out} already exists (pass overwrite to replace it)")
  return out


@contextlib.contextmanager
def atomic_dir(out_dir, overwrite: bool = False):
  """Yields a fresh temporary directory; on success it becomes `out_dir`, on error it is removed."""
  out = check_writable(out_dir, overwrite)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_sibling(out, "tmp")
  tmp.mkdir()
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if out.exists():
    trash = _tmp_sibling(out, "old")
    os.rename(out, trash)
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    os.rename(tmp, out)


def atomic_write_text(path, text: str) -> None:
  path = Path(path)
  tmp = _tmp_sibling(path, "tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
