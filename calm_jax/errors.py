"""The one base class of the errors a user causes and can fix: bad input, refused operations.

Every such error names its culprit (file, key, tensor, path) in its message; the entry points in
launch/ print that message and exit non-zero instead of a traceback. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import errno


class UserError(ValueError):
  """Bad input or a refused operation; the message says what and where."""


# OSErrors that are the machine's state, not a bug: said in one line, naming the path.
OS_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large (a file-size limit, or the file system's)",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.EMFILE: "too many open files"}


def os_message(e: OSError, where=None) -> str | None:
  """One line for an OSError a user can fix (a full disk, a read-only output), or None for others."""
  if e.errno not in OS_ERRNOS:
    return None
  path = e.filename or where
  return f"{OS_ERRNOS[e.errno]}" + (f" while writing {path}" if path else "") + (
      " (free some space, or write elsewhere)" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
