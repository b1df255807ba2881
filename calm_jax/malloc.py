"""glibc malloc policy for processes that allocate tensor-sized buffers in a loop.

The checkpoint merge (per tensor) and XLA on the CPU (per training step: activations, gradients,
temporaries) allocate and free large buffers, from several threads. Under glibc's defaults most of
them come from fresh memory maps (sizes above the mmap threshold, or any size in a worker thread's
arena once its 64 MiB heap is full), which the kernel zero-fills page by page on first touch: in
the 0.48B-parameter benchmark merge, page faults and `clear_page` took ~40% of the run.

Two policies:
- `TUNED` (`launch.train`, `launch.merge`, `launch.demo`, the CALM benchmark): one arena for all
  threads, buffers up to 1 GiB from the heap, no trimming, so a freed buffer is reused by the next
  tensor or step. Warm-cache task-arithmetic merge 9.7 s -> 6.0 s (median of 3), peak RSS 13-21x
  the largest tensor (tests/test_merging_memory.py); CALM benchmark training step on 2 CPU cores
  ~1.2-1.3 s -> ~0.8-0.9 s at steady state (docs/benchmarks.md). glibc reads tunables only at
  process start (and `mallopt` caps the mmap threshold at 32 MiB), so an entry point re-executes
  itself under them (`reexec_tuned`).
- `return_freed_memory` (the library's `low_memory` merge, in a running process such as a
  notebook): every large buffer is a fresh map, returned at free: the smallest peak RSS (~11x the
  largest tensor), the slowest.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

TUNED = "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"
_SKIP = "CALM_JAX_NO_REEXEC"  # set: entry points run under the allocator they were started with


def is_tuned() -> bool:
  """Whether this process started under `TUNED`."""
  return os.environ.get("GLIBC_TUNABLES") == TUNED


def reexec_tuned(module: str | None = None) -> None:
  """Replaces this process (same pid) by `python -m module <its arguments>` (module None: the same
  script, `python sys.argv[0] ...`) under `TUNED`.

  A no-op off glibc, when already tuned, when the user set GLIBC_TUNABLES (their choice wins) or
  CALM_JAX_NO_REEXEC. Call it first thing in an entry point, before heavy imports.
  """
  if os.environ.get(_SKIP) or "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux"):
    return
  if platform.libc_ver()[0] != "glibc":
    return
  sys.stdout.flush()
  sys.stderr.flush()
  head = ["-m", module] if module else [sys.argv[0]]
  os.execve(sys.executable, [sys.executable, *head, *sys.argv[1:]], {**os.environ, "GLIBC_TUNABLES": TUNED})


def return_freed_memory() -> None:
  """Makes glibc give freed tensor-sized blocks back to the OS at once (no-op elsewhere).

  Allocations >= 64 KiB are mmap'ed (unmapped on free) and the heap is trimmed whenever its top
  is free. Process-wide and not undone; overrides `TUNED`.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-1, 0)        # M_TRIM_THRESHOLD
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    pass
