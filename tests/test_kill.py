"""Killed at any point, a merge or a training leaves either nothing or a complete, valid result, no
temporary directory survives the next run, and that run ends where an uninterrupted one ends.

Each case stops the entry point at a point (`tests/kill_driver.py`: the merge's statistics pass,
mid-write; a training step after a checkpoint, an orbax save in flight, the HF export), sends a
signal (SIGINT, SIGTERM, SIGKILL), then checks what is on disk, runs the same command again, and
compares its result byte for byte (merge) or tensor for tensor (training) with an uninterrupted run.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import merge_zoo
import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "CALM_JAX_NO_REEXEC": "1"}
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
TRAIN_ARGS = ("--config=configs/pretrain.py:tiny", "--config.steps=20", "--config.checkpoint.every=5",
              "--config.log_every=5")


def temp_leftovers(root: Path) -> list[str]:
  """Our temporary siblings, lock files and orbax's temporary checkpoint directories under root."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock") or "orbax-checkpoint-tmp" in p.name)


def run(module_args, **kw):
  return subprocess.run([sys.executable, "-m", *module_args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=ENV, **kw)


def killed_at(point, sig, module_args, ready: Path):
  """Runs `module_args` under the driver, signals it when it reaches `point`; returns (code, stderr)."""
  proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_driver.py"), point, str(ready), "--",
                           *module_args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not ready.exists():
    if proc.poll() is not None:
      raise AssertionError(f"ended before reaching {point}: {proc.communicate()[1][-3000:]}")
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def files(d: Path) -> dict:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  return merge_zoo.make_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def merged_once(zoo, tmp_path_factory):
  out = tmp_path_factory.mktemp("ref") / "out"
  p = run(merge_args(zoo, out))
  assert p.returncode == 0, p.stderr[-2000:]
  return files(out)


def merge_args(zoo, out):
  base, fts = zoo
  return ("launch.merge", "--config=configs/merge/metagpt.py", f"--config.base={base}",
          f"--config.models={','.join(map(str, fts))}", f"--config.out={out}", "--config.progress=False",
          "--config.max_shard_size=8KB")


@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("point", ["merge-stats", "merge-write"])
def test_killed_merge(zoo, merged_once, tmp_path, point, sig):
  out = tmp_path / "out"
  code, err = killed_at(point, SIGNALS[sig], merge_args(zoo, out), tmp_path / "ready")
  assert code != 0
  if sig != "SIGKILL":  # handled like Ctrl-C: one line, temporary output and lock removed
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not temp_leftovers(tmp_path)
  assert not out.exists()  # never a partial output where a finished one would be
  rerun = run(merge_args(zoo, out))
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert not temp_leftovers(tmp_path)  # the rerun removed what a killed job left
  got = files(out)
  assert got.keys() == merged_once.keys()
  for name, data in got.items():
    if name != "merge_report.json":  # records its own paths
      assert data == merged_once[name], name


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
  w = tmp_path_factory.mktemp("ref") / "w"
  p = run(("launch.train", *TRAIN_ARGS, f"--workdir={w}"))
  assert p.returncode == 0, p.stderr[-2000:]
  return merge_zoo.read(w / "hf")


@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("point", ["train-step", "orbax-save", "hf-export"])
def test_killed_training_resumes_to_the_same_parameters(trained_once, tmp_path, point, sig):
  w = tmp_path / "w"
  code, err = killed_at(point, SIGNALS[sig], ("launch.train", *TRAIN_ARGS, f"--workdir={w}"), tmp_path / "ready")
  assert code != 0
  if sig != "SIGKILL":
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not [p for p in temp_leftovers(tmp_path) if "orbax" not in p]  # ours: removed at once
  assert not (w / "hf").exists() or merge_zoo.read(w / "hf").keys() == trained_once.keys()
  resumed = run(("launch.train", *TRAIN_ARGS, f"--workdir={w}"))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stdout
  assert not temp_leftovers(tmp_path)  # orbax's temporary checkpoint included
  got = merge_zoo.read(w / "hf")
  assert got.keys() == trained_once.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], trained_once[k], err_msg=k)
