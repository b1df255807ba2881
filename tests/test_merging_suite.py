"""The merging experiment end to end (`configs/merge/suite.py:tiny`) on the session's tiny base:
results.json has the promised schema and its normalized accuracies follow from its own numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from merging.suite import normalized_accuracy

ROOT = Path(__file__).resolve().parents[1]


def test_normalized_accuracy_skips_tasks_the_finetune_fails():
  assert normalized_accuracy({"a": 0.5, "b": 0.2}, {"a": 1.0, "b": 0.0}) == pytest.approx(0.5)
  assert normalized_accuracy({"a": 0.5, "b": 0.9}, {"a": 0.5, "b": 0.6}) == pytest.approx((1.0 + 1.5) / 2)


def test_merge_suite_tiny(tiny_base_dir, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/merge/suite.py:tiny",
                         f"--workdir={tmp_path}", f"--config.base_workdir={tiny_base_dir}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "normalized" in proc.stdout and (tmp_path / "results.png").exists()
  res = json.loads((tmp_path / "results.json").read_text())
  tasks = ["addition", "max"]
  assert set(res["finetuned"]) == set(tasks)
  assert set(res["merged"]) == {"task_arithmetic λ=0.2", "task_arithmetic λ=0.6", "task_arithmetic (val λ)",
                                "metagpt", "metagpt+ties"}
  sel = res["selected_lambda"]  # the grid point best on the validation split, reported on test
  assert set(sel["val_normalized"]) == {"task_arithmetic λ=0.2", "task_arithmetic λ=0.6"}
  best = max(sel["val_normalized"].values())
  assert sel["val_normalized"][sel["row"]] == best and sel["lam"] in (0.2, 0.6)
  assert res["merged"]["task_arithmetic (val λ)"] == res["merged"][sel["row"]]
  assert set(res["normalized"]) == set(res["merged"])
  for name, acc in res["merged"].items():
    assert set(acc) == set(tasks)
    assert all(0 <= a <= 1 for a in acc.values())
    ratios = [acc[t] / res["finetuned"][t] for t in tasks if res["finetuned"][t] > 0]
    assert res["normalized"][name] == pytest.approx(sum(ratios) / len(ratios) if ratios else 0.0)
  lam = res["metagpt_lambdas"]["metagpt"]
  assert len(lam) == 2 and sum(lam) == pytest.approx(1.0)
  assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())  # keep=False
