"""Outputs that are never half-written, never someone else's, and never written twice at once.

- `atomic_dir` / `atomic_write_text`: write under a temporary sibling name and rename into place
  when complete, so a killed or failed job leaves nothing where a finished result would be.
  Temporary siblings are named `.<name>.<tag>-<host>-<pid>-<hex>`; the next writer of the same
  output removes the ones whose process on this host is gone (`clean_stale_siblings`).
- `check_output`: before any work, an output that exists is refused unless `overwrite`, one that
  is (or contains, or lies inside) an input is refused whatever the spelling of its path (real
  paths and inodes are compared), and its directory must be writable.
- `exclusive`: an advisory lock (`fcntl.flock`) on an output or a workdir for as long as a job
  writes it; a second job gets a clear error instead of silently replacing the first one's work.
  The kernel drops the lock when the process ends, killed or not.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import uuid
from pathlib import Path

from calm_jax.errors import UserError

_HOST = socket.gethostname().replace("-", "_").replace(".", "_") or "host"


class OutputExistsError(UserError, FileExistsError):
  """The output exists and overwriting was not asked for."""


class OutputError(UserError):
  """An output that would destroy an input, cannot be written, or is in use by another job."""


def _tmp_sibling(path: Path, tag: str) -> Path:
  return path.parent / f".{path.name}.{tag}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def clean_stale_siblings(path) -> list[Path]:
  """Removes temporary siblings of `path` (`.<name>.tmp-…`, `.<name>.old-…`) left by a job on this
  host that no longer runs; returns what was removed. Others' (live, or another host's) are kept."""
  path = Path(path)
  removed = []
  try:
    entries = list(path.parent.iterdir())
  except OSError:
    return removed
  for p in entries:
    for tag in ("tmp", "old"):
      prefix = f".{path.name}.{tag}-{_HOST}-"
      if p.name.startswith(prefix):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
          if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
          else:
            with contextlib.suppress(OSError):
              p.unlink()
          removed.append(p)
  return removed


def _identity(p: Path):
  """(device, inode) of an existing path, else None."""
  try:
    st = p.stat()
  except OSError:
    return None
  return st.st_dev, st.st_ino


def same_or_nested(a, b) -> bool:
  """Whether paths a and b are the same file or directory, or one lies inside the other, however
  they are spelled (`x/sub/../y`, symlinks, hard links to the same inode)."""
  ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
  if ra == rb or ra in rb.parents or rb in ra.parents:
    return True
  ia, ib = _identity(ra), _identity(rb)
  return ia is not None and ia == ib


def check_output(out, *, overwrite: bool = False, inputs=()) -> Path:
  """The absolute output path, after the checks every writer makes before any work: the output is
  none of the `inputs` (nor inside one, nor containing one), exists only if `overwrite`, and its
  parent directory exists or can be made, and is writable."""
  out = Path(out).absolute()
  for i in inputs:
    if i is not None and same_or_nested(out, i):
      how = "is one of the inputs" if os.path.realpath(out) == os.path.realpath(i) else "overlaps the input"
      raise OutputError(f"output {out} {how} ({i}); nothing was written: choose another output")
  if out.exists() and not overwrite:
    raise OutputExistsError(f"output {out} already exists (pass overwrite to replace it)")
  parent = out.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise OutputError(f"cannot write {out}: {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise OutputError(f"cannot write {out}: {parent} is not writable")
  return out


def check_writable(out_dir, overwrite: bool = False) -> Path:
  """Fails before any work if the output exists and overwriting was not asked for, or cannot be written."""
  return check_output(out_dir, overwrite=overwrite)


_HELD: dict[Path, int] = {}  # locks this process holds -> nesting depth (a job locks, then saves inside)


@contextlib.contextmanager
def exclusive(path, what: str = "output", wait: bool = False):
  """Holds an advisory lock on `path` (an output or a workdir, existing or not) while the block runs.

  The lock is a sibling file `.<name>.lock`; a second job fails at once with `OutputError` naming
  the path and the process that holds it (or, with `wait`, waits for it). Re-entrant within a process.
  Released on exit (and by the kernel when the process dies, however it dies); the lock file is
  removed by its holder.
  """
  path = Path(os.path.realpath(Path(path).absolute()))
  if path in _HELD:
    _HELD[path] += 1
    try:
      yield path
    finally:
      _HELD[path] -= 1
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  lock = path.parent / f".{path.name}.lock"
  while True:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise OutputError(f"{what} {path} is in use by another job ({holder or 'unknown process'}); "
                          "wait for it to finish or choose another") from None
      raise
    if _same_inode(fd, lock):
      break
    os.close(fd)  # the file was removed between open and lock by its last holder: lock a new one
  _HELD[path] = 1
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    yield path
  finally:
    del _HELD[path]
    with contextlib.suppress(OSError):
      os.unlink(lock)
    os.close(fd)


def _same_inode(fd: int, path: Path) -> bool:
  st = os.fstat(fd)
  return _identity(path) == (st.st_dev, st.st_ino)


@contextlib.contextmanager
def atomic_dir(out_dir, overwrite: bool = False, inputs=()):
  """Yields a fresh temporary directory; on success it becomes `out_dir`, on error it is removed.
  The output is checked (`check_output`) and locked (`exclusive`) for the duration."""
  out = check_output(out_dir, overwrite=overwrite, inputs=inputs)
  out.parent.mkdir(parents=True, exist_ok=True)
  with exclusive(out):
    clean_stale_siblings(out)
    out = check_output(out, overwrite=overwrite, inputs=inputs)  # again, under the lock
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


@contextlib.contextmanager
def scratch_dir(path):
  """Yields a temporary sibling directory of `path` for intermediate files, removed on exit (and,
  if the job is killed, by the next writer of `path`: `clean_stale_siblings`)."""
  path = Path(path).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_sibling(path, "tmp")
  tmp.mkdir()
  try:
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path, inputs=()):
  """Yields a temporary sibling path to write the file `path` to; on success it replaces `path` (no
  reader ever sees a partial file), on error it is removed. Locked and checked like `atomic_dir`
  (an existing file is replaced: a file output is a run's own, rewritten as it improves)."""
  path = check_output(path, overwrite=True, inputs=inputs)
  path.parent.mkdir(parents=True, exist_ok=True)
  with exclusive(path):
    clean_stale_siblings(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
      yield tmp
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        tmp.unlink()
      raise


def atomic_write_text(path, text: str) -> None:
  with atomic_file(path) as tmp:
    tmp.write_text(text)
