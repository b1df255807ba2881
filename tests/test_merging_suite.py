"""The merging experiment on the trained tiny base (`configs/merge/suite.py:tiny`, fine-tunes long
enough to move the models): MetaGPT's λ_t equal the closed form computed with numpy from the
checkpoints on disk, `launch.eval` re-scores the merged models from their HF directories alone and
gets the reported accuracies, and merging does what it is for — the merge keeps a task that the
other task's fine-tune forgot."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from merging.suite import normalized_accuracy

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("addition", "max")


def test_normalized_accuracy_skips_tasks_the_finetune_fails():
  assert normalized_accuracy({"a": 0.5, "b": 0.2}, {"a": 1.0, "b": 0.0}) == pytest.approx(0.5)
  assert normalized_accuracy({"a": 0.5, "b": 0.9}, {"a": 0.5, "b": 0.6}) == pytest.approx((1.0 + 1.5) / 2)


@pytest.fixture(scope="module")
def suite(tiny_base_dir, tmp_path_factory):
  """The tiny suite with 60 fine-tuning steps of 32 per task and the merged models kept."""
  workdir = tmp_path_factory.mktemp("merge_suite")
  p = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/merge/suite.py:tiny",
                      f"--workdir={workdir}", f"--config.base_workdir={tiny_base_dir}",
                      "--config.finetune.steps=60", "--config.finetune.batch_size=32", "--config.eval.n_per_task=100",
                      "--config.merge.keep=True"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "normalized" in p.stdout and (workdir / "results.png").stat().st_size > 0
  return workdir, json.loads((workdir / "results.json").read_text())


def weights(hf_dir: Path) -> dict:
  return {k: v.astype(np.float64) for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_metagpt_lambdas_are_the_closed_form_of_the_saved_checkpoints(suite, tiny_base_dir):
  """λ_t = ‖θ_t − θ_0‖² / Σ_k ‖θ_k − θ_0‖² over the whole parameter vector, from the files."""
  workdir, res = suite
  base = weights(tiny_base_dir / "hf")
  sq = [sum(np.sum((w[k] - base[k]) ** 2) for k in base)
        for w in (weights(workdir / "finetuned" / t / "hf") for t in TASKS)]
  np.testing.assert_allclose(res["metagpt_lambdas"]["metagpt"], np.asarray(sq) / sum(sq), rtol=1e-5)
  assert abs(sq[0] - sq[1]) > 0.01 * sum(sq)  # the two fine-tunes moved by different amounts: λ is not 1/2


@pytest.mark.parametrize("row,dirname", [("metagpt", "metagpt"), ("task_arithmetic λ=0.2", "task_arithmetic_lam0.2")])
def test_launch_eval_rescores_a_merged_model_from_its_directory(suite, tmp_path, row, dirname):
  workdir, res = suite
  merged = workdir / "merged" / dirname
  p = subprocess.run([sys.executable, "-m", "launch.eval", f"--model={merged}", f"--tasks={','.join(TASKS)}",
                      "--n_per_task=100", f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  acc = json.loads((tmp_path / "results.json").read_text())["accuracy"]
  assert {t: acc[t] for t in TASKS} == res["merged"][row]


def test_the_merge_keeps_what_a_single_finetune_forgets(suite):
  """Fine-tuning on max wipes out most of the base's addition; MetaGPT's merge of the two fine-tunes
  keeps addition far above that (measured: 15 % after the max fine-tune, 60 % merged, base 81 %),
  and keeps max within a few points of its own fine-tune (79 vs 84)."""
  _, res = suite
  forgot = res["finetuned_all"]["max"]["addition"]
  merged = res["merged"]["metagpt"]
  assert res["base"]["addition"] - forgot >= 0.4  # the forgetting the merge has to undo is real
  assert merged["addition"] - forgot >= 0.3
  assert merged["max"] >= res["finetuned"]["max"] - 0.1
