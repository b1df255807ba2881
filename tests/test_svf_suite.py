"""Transformer² on the trained tiny base: the first-pass dispatch against the prompts' own tags, the
suite end to end (`configs/svf/suite.py:tiny`: counts by hand, dispatch decisions, an expert re-scored
as an HF model by launch.eval), and an SVF expert that learns a task the base cannot."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_prompt_dispatch_picks_the_right_expert(tiny_base_dir):
  """Stated bound: >= 95 % of known-task test prompts go to their expert (training tasks) or to the
  base ("other": the base's other tasks). Measured on runs/demo/base: 100 % (400 prompts)."""
  from calm_jax import hf
  from calm_jax.tasks import make_eval_set
  from calm_jax.tokenizers import load_tokenizer
  from configs.svf.suite import get_config
  from svf.dispatch import classify, dispatch_accuracy
  from svf.suite import dispatch_truth
  from svf.train import registry_for
  c = get_config()
  labels = dict(c.dispatch.labels)
  model, tok = hf.load(tiny_base_dir / "hf"), load_tokenizer(tiny_base_dir / "hf")
  known = make_eval_set(list(c.expert_tasks) + list(c.other_tasks), 25, split="test", seed=2,
                        registry=registry_for(c))
  got = classify(model, tok, [ex.prompt for ex in known], template=c.dispatch.template, labels=list(labels),
                 head_chars=c.dispatch.head_chars)
  truth = dispatch_truth(known, labels)
  assert sum(t is not None for t in truth) == 75 and sum(t is None for t in truth) == 125
  assert dispatch_accuracy([labels.get(g) for g in got], truth) >= 0.95


def test_svf_suite_tiny(tiny_base_dir, tmp_path):
  env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # compile-bound tiny run
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/svf/suite.py:tiny",
                         f"--workdir={tmp_path}", f"--config.base_workdir={tiny_base_dir}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "held-out tasks" in proc.stdout and (tmp_path / "results.png").stat().st_size > 0
  res = json.loads((tmp_path / "results.json").read_text())
  experts, held = ["addition", "max"], ["addition_3d", "mixed"]
  assert set(res["train_tasks"]) == {"base", "svf", "lora"} and set(res["heldout"]) == {"base", "prompt",
                                                                                      "classifier", "cem"}
  # parameter counts by hand: SVF = L × 3 MLP matrices × min(E, F); LoRA (rank auto) at least that
  base_cfg = json.loads((tiny_base_dir / "hf" / "config.json").read_text())
  assert res["params"]["svf"] == base_cfg["num_hidden_layers"] * 3 * min(base_cfg["hidden_size"],
                                                                        base_cfg["intermediate_size"])
  assert res["params"]["lora"] >= res["params"]["svf"]
  # prompt dispatch sends addition_3d ("add:...") to the addition expert, and each prompt of the mixed
  # task by its own tag: add -> addition, max -> max, sub (no expert in the tiny suite) -> the base
  d = res["adaptation"]["prompt"]["dispatch"]
  assert d["addition_3d"] == {"addition": 8}
  from calm_jax.tasks import make_eval_set
  from configs.svf.suite import get_config
  from svf.train import registry_for
  mixed = make_eval_set(["mixed"], 8, split="test", seed=0, registry=registry_for(get_config("tiny")))
  want = {}
  for ex in mixed:
    k = {"add": "addition", "max": "max", "sub": "None"}[ex.prompt.split(":")[0]]
    want[k] = want.get(k, 0) + 1
  assert d["mixed"] == want
  assert res["dispatch_accuracy"]["prompt"] >= 0.95
  cem = res["adaptation"]["cem"]
  for t in held:  # CEM samples α in [0, 1]^K (clamped), one per expert
    assert len(cem[t]["alpha"]) == len(experts) and all(0 <= a <= 1 for a in cem[t]["alpha"])
  # An expert file is a model: the base with W' = U diag(σ⊙m) Vᵀ, exported as an HF directory and
  # re-scored by launch.eval in another process, gets the accuracy the suite reported for it.
  from calm_jax import hf
  from svf.train import attach_expert, load_svf_model
  c = get_config("tiny")
  c.base_workdir = str(tiny_base_dir)
  model = load_svf_model(c, tiny_base_dir / "hf")
  zs = attach_expert(model, tmp_path / "experts" / "addition" / "expert.safetensors")
  out = hf.save_params(model.config, model.adapted_params(zs), tmp_path / "svf_addition_hf",
                       copy_from=tiny_base_dir / "hf")
  p = subprocess.run([sys.executable, "-m", "launch.eval", f"--model={out}", "--tasks=addition",
                      f"--n_per_task={c.eval.n_per_task}", f"--workdir={tmp_path / 'rescore'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  rescored = json.loads((tmp_path / "rescore" / "results.json").read_text())["accuracy"]["addition"]
  assert rescored == res["train_tasks"]["svf"]["addition"]


def test_svf_expert_learns_a_task_the_base_cannot(tiny_base_dir, tmp_path):
  """`count` is held out of the base's mixture (0 % exact match). An SVF expert — 1,152 singular-value
  scales and nothing else — trained on it by next-token prediction (400 steps of 64, lr 3e-2) reaches
  40 % on its test split (measured); asserted: at least 20 points above the base."""
  from calm_jax.evaluate import evaluate_checkpoint
  p = subprocess.run([sys.executable, "-m", "launch.train",
                      "--config=configs/svf/expert.py:task=count,objective=ntp", f"--workdir={tmp_path}", f"--config.base_workdir={tiny_base_dir}", "--config.steps=400",
                      "--config.batch_size=64", "--config.optimizer.lr=3e-2", "--config.eval_every=0"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  base = evaluate_checkpoint(tiny_base_dir / "hf", tasks=["count"], n_per_task=200)["count"]  # = the expert's n_test
  assert res["params"] == 1152 and res["test_accuracy"] >= base + 0.2, (res["test_accuracy"], base)
