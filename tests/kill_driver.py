"""Runs an entry point with a pause injected at a named point, so a test can signal it there.

  python tests/kill_driver.py POINT READY_FILE -- launch.merge --config=... (or launch.train ...)

Not a test module. At POINT the process writes READY_FILE and waits (until a signal arrives, the
file READY_FILE + ".go" appears, or 120 s pass), then goes on. Points:
  merge-stats   the merge's first statistics-pass tensor (the main thread)
  merge-write   the third tensor the merge's writer thread writes (mid-write, inside the temp dir)
  merge-read    the first statistics-pass tensor, before it is read (a test then shrinks an input)
  hf-export     the first tensor of an HF export (`hf.save`, e.g. pretrain's final save)
  orbax-save    step 10's orbax checkpoint, written to its temporary directory, before its rename
  train-step    right after the checkpoint of step 10 is saved
The entry point runs in this process (CALM_JAX_NO_REEXEC must be set, so it does not re-execute).
"""
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

SIGNALLED = threading.Event()


def pause(ready: Path) -> None:
  ready.write_text(str(os.getpid()))
  go = Path(str(ready) + ".go")
  deadline = time.time() + 120
  while not (SIGNALLED.is_set() or go.exists() or time.time() > deadline):
    time.sleep(0.02)


def patch(point: str, ready: Path) -> None:
  count = {"n": 0}

  def nth(k):
    count["n"] += 1
    return count["n"] == k

  if point in ("merge-stats", "merge-read"):
    from merging.engine import Merger
    orig = Merger._stats

    def stats(self, p, *a, **kw):
      if nth(1) and point == "merge-read":
        pause(ready)
      out = orig(self, p, *a, **kw)
      if count["n"] == 1 and point == "merge-stats":
        pause(ready)
      return out
    Merger._stats = stats
  elif point in ("merge-write", "hf-export"):
    from calm_jax.safetensors_io import ShardedWriter
    orig_write = ShardedWriter.write
    k = 3 if point == "merge-write" else 1

    def write(self, name, array):
      out = orig_write(self, name, array)
      if nth(k):
        pause(ready)
      return out
    ShardedWriter.write = write
  elif point == "orbax-save":
    from orbax.checkpoint._src.path import atomicity
    orig_fin = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *a, **kw):
      if Path(str(getattr(self, "_final_path", ""))).name == "10":  # step 10's directory: step 5 is there
        pause(ready)
      return await orig_fin(self, *a, **kw)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
  elif point == "train-step":
    from calm_jax.train.checkpoint import Checkpointer
    orig_save = Checkpointer.maybe_save

    def maybe_save(self, step, *a, **kw):
      out = orig_save(self, step, *a, **kw)
      if step == 10:
        pause(ready)
      return out
    Checkpointer.maybe_save = maybe_save
  else:
    raise SystemExit(f"unknown point {point!r}")


def main():
  point, ready, sep, module, *args = sys.argv[1:]
  assert sep == "--" and os.environ.get("CALM_JAX_NO_REEXEC")
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  # Whatever handler the entry point installs, a signal also ends the pause (as a slow disk would end).
  install = signal.signal

  def watched(signum, handler):
    if callable(handler):
      def both(s, f):
        SIGNALLED.set()
        return handler(s, f)
      return install(signum, both)
    return install(signum, handler)
  signal.signal = watched
  signal.signal(signal.SIGINT, signal.default_int_handler)
  patch(point, Path(ready))
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
