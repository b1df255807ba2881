"""Runs a worker script as two `jax.distributed` processes on localhost (gloo collectives).

Not a test module: test_distributed.py and test_merging_multihost.py start their workers here.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(worker: Path, args, log_dir: Path, timeout_s: float = 120):
  """Starts `python worker *args` as process 0 and 1 of one job; returns (exit codes, logs)."""
  port = free_port()
  procs, logs = [], []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
               JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=str(ROOT))
    log = open(Path(log_dir) / f"process{pid}.log", "w+")
    procs.append(subprocess.Popen([sys.executable, str(worker), *map(str, args)], env=env, cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  # If one process fails, the other would wait for it until JAX's own timeouts (minutes):
  # stop both as soon as either fails, or at the deadline.
  deadline = time.monotonic() + timeout_s
  timed_out = False
  while any(p.poll() is None for p in procs):
    timed_out = time.monotonic() > deadline
    if timed_out or any(p.poll() not in (None, 0) for p in procs):
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  codes = [p.wait() for p in procs]
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  if timed_out:
    pytest.fail(f"two-process run did not finish in {timeout_s}s:\n" + "\n---\n".join(texts))
  return codes, texts


def failure_message(codes, logs) -> str:
  return "\n---\n".join(f"process {i} (exit {c}):\n{log[-4000:]}" for i, (c, log) in enumerate(zip(codes, logs)))
