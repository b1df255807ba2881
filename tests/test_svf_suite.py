"""Transformer² on the session's trained tiny base: the first-pass dispatch and the suite end to end
(`configs/svf/suite.py:tiny`): results.json has the promised schema and its numbers follow from
the runs that produced them."""
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
  assert "held-out tasks" in proc.stdout and (tmp_path / "results.png").exists()
  res = json.loads((tmp_path / "results.json").read_text())
  experts, held = ["addition", "max"], ["addition_3d", "mixed"]
  assert set(res["train_tasks"]) == {"base", "svf", "lora"}
  for row in res["train_tasks"].values():
    assert set(row) == set(experts) and all(0 <= a <= 1 for a in row.values())
  assert set(res["heldout"]) == {"base", "prompt", "classifier", "cem"}
  for row in res["heldout"].values():
    assert set(row) == set(held) and all(0 <= a <= 1 for a in row.values())
  # the table's SVF / LoRA cells are the expert runs' own test accuracies
  for t in experts:
    assert res["train_tasks"]["svf"][t] == json.loads((tmp_path / "experts" / t / "results.json").read_text())["test_accuracy"]
    assert res["train_tasks"]["lora"][t] == json.loads((tmp_path / "lora" / t / "results.json").read_text())["test_accuracy"]
  # parameter counts: SVF = L × 3 MLP matrices × min(E, F); LoRA (rank auto) at least that
  base_cfg = json.loads((tiny_base_dir / "hf" / "config.json").read_text())
  assert res["params"]["svf"] == base_cfg["num_hidden_layers"] * 3 * min(base_cfg["hidden_size"],
                                                                        base_cfg["intermediate_size"])
  assert res["params"]["lora"] >= res["params"]["svf"]
  assert res["seconds"]["first_pass"] > 0 and res["seconds"]["second_pass"] > 0
  assert set(res["seconds"]["by_strategy_with_compile"]) == {"prompt", "classifier", "cem"}
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
  for t in held:
    assert len(cem[t]["alpha"]) == 2 and all(0 <= a <= 1 for a in cem[t]["alpha"])
