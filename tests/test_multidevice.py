"""Every method's `:tiny` experiment config runs through `launch.train` on 1, 2 and 8 (fake CPU)
devices, and the runs on 2 and 8 devices end where the 1-device run ends: the same metrics
(training losses at every logged step, and every number in each results.json) within float
tolerance. Data and seeds are deterministic, so the only difference is how the work is laid out
(data-parallel over the default mesh, the rest replicated: `calm_jax.sharding.mesh_shape`).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEVICES = (1, 2, 8)
# (name, config, whether it trains on the tiny base from the `pretrain` run)
RUNS = (
    ("pretrain", "configs/pretrain.py:tiny", False),
    ("svf_expert", "configs/svf/expert.py:task=addition,tiny", True),
    ("svf_suite", "configs/svf/suite.py:tiny", True),
    ("merge_suite", "configs/merge/suite.py:tiny", True),
    ("moa_expert", "configs/moa/expert.py:domain=count,tiny", True),
    ("moa_suite", "configs/moa/suite.py:tiny", True),
    ("calm", "configs/calm/kv_arithmetic.py:tiny", False),
)
# Not comparable across runs: wall times, and CEM's chosen α, an argmax over candidates whose
# fitness ties on the tiny base (all at 0 accuracy) and is broken by log-likelihoods equal to 1e-7.
SKIP = ("seconds", "timings", "alpha", "fewshot_loglik")


def env_for(n: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # compile-bound tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{devices: {run name: (workdir, stdout + stderr)}}: every config run once per device count."""
  out = {}
  for n in DEVICES:
    root = tmp_path_factory.mktemp(f"dev{n}")
    seen = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], env=env_for(n),
                          capture_output=True, text=True, check=True).stdout.split()[-1]
    assert int(seen) == n
    out[n] = {}
    for name, config, on_base in RUNS:
      cmd = [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={root / name}"]
      if on_base:
        cmd.append(f"--config.base_workdir={root / 'pretrain'}")
      p = subprocess.run(cmd, cwd=ROOT, env=env_for(n), capture_output=True, text=True, timeout=600)
      assert p.returncode == 0, f"{name} on {n} devices:\n{p.stderr[-3000:]}"
      out[n][name] = (root / name, p.stdout + p.stderr)
  return out


def numbers(x, path=""):
  """Every number of a results.json as {path: value}, without the SKIP keys."""
  if isinstance(x, dict):
    return {k: v for key, val in x.items() if key not in SKIP for k, v in numbers(val, f"{path}/{key}").items()}
  if isinstance(x, list):
    return {k: v for i, val in enumerate(x) for k, v in numbers(val, f"{path}[{i}]").items()}
  if isinstance(x, (int, float)) and not isinstance(x, bool):
    return {path: float(x)}
  return {}


def metric_rows(workdir: Path) -> dict:
  """{metrics.jsonl path: [{metric: value}]} for every training stage of a run."""
  return {str(p.relative_to(workdir)): [{k: v for k, v in json.loads(line).items() if k != "time"}
                                        for line in p.read_text().splitlines()]
          for p in sorted(workdir.rglob("metrics.jsonl"))}


@pytest.mark.parametrize("n", [d for d in DEVICES if d > 1])
@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_runs_on_n_devices_equal_one_device(runs, name, n):
  one_dir, _ = runs[1][name]
  got_dir, log = runs[n][name]
  if name in ("pretrain", "svf_expert", "moa_expert", "calm"):  # the trainer says where it ran
    assert f"on mesh {{'data': {n}," in log, log[-2000:]
  results = sorted(p.relative_to(one_dir) for p in one_dir.rglob("results.json"))
  assert results and results == sorted(p.relative_to(got_dir) for p in got_dir.rglob("results.json"))
  for rel in results:
    want, got = (numbers(json.loads((d / rel).read_text())) for d in (one_dir, got_dir))
    assert want.keys() == got.keys(), rel
    bad = {k: (want[k], got[k]) for k in want if not math.isclose(want[k], got[k], rel_tol=1e-5, abs_tol=1e-6)}
    assert not bad, f"{rel}: {bad}"
  want, got = metric_rows(one_dir), metric_rows(got_dir)
  assert want and want.keys() == got.keys()
  for stage, rows in want.items():
    assert [r["step"] for r in rows] == [r["step"] for r in got[stage]], stage
    for a, b in zip(rows, got[stage]):
      for k, v in a.items():
        assert math.isclose(v, b[k], rel_tol=1e-4, abs_tol=1e-6), (stage, a["step"], k, v, b[k])
