"""MoA on the trained tiny base: routers reach the stated accuracy on held-out labelled prompts of
the suite's domains; in the tiny suite end to end the oracle mode (each example's labelled expert,
gathered per example in one batch) equals each expert merged into the weights and decoded plainly;
and a domain expert lifts a task the base cannot do."""
import json
from pathlib import Path

import numpy as np
import pytest

from calm_jax import hf, lora as L
from calm_jax.registry import get_method
from calm_jax.tasks import task_registry
from calm_jax.tokenizers import load_tokenizer
from configs.moa.suite import get_config
from moa import evaluate as E
from moa.experts import stack_loras
from moa.suite import MODES, train_moa

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_router_accuracy_on_suite_domains(tiny_base_dir, tmp_path):
  c = get_config()
  base_hf = Path(tiny_base_dir) / "hf"
  tok, reg = load_tokenizer(base_hf), task_registry(c.data.task_args)
  base = hf.load(base_hf)
  spec1 = L.LoRASpec.from_config(base.config, c.lora)
  domains = list(c.domains)
  experts, spec = stack_loras([L.init_lora(base.config, spec1, i) for i in range(len(domains))],
                              [spec1] * len(domains))
  c.moa.steps, c.moa.optimizer.lr = 40, 1e-2
  moa = train_moa(base_hf, spec, experts, None, domains, c.moa, c.moa.gamma, False, tmp_path, tok, reg, 0)
  acc = E.router_accuracy(base, spec, moa.factors(), moa.routers(), tok, domains, n_per_task=50, split="test",
                          registry=reg)
  assert set(acc) == {str(i) for i in range(base.config.num_layers)}
  assert min(acc.values()) >= c.eval.router_min_accuracy, acc


def test_suite_tiny_end_to_end(tiny_base_dir, tmp_path):
  import moa.suite  # noqa: F401  (registers "moa_suite")
  c = get_config("tiny")
  c.base_workdir = str(tiny_base_dir)
  c.scratch, c.new_domain, c.inference.top_k = False, "", 1
  get_method("moa_suite")(c, tmp_path)
  res = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "results.png").stat().st_size > 0
  assert set(res["per_domain"]) == set(MODES) and set(res["router_accuracy"]) == {"0", "1", "2"}
  # The oracle (label picks the stacked expert, gathered per example) = that expert merged into the
  # weights and decoded plainly.
  base = hf.load(Path(tiny_base_dir) / "hf")
  tok, reg = load_tokenizer(Path(tiny_base_dir) / "hf"), task_registry(c.data.task_args)
  for d in c.domains:
    lora, spec, _ = L.load_adapter(tmp_path / "experts" / d / "adapter", base.params(), cfg=base.config)
    merged = L.LoRAModel(base, spec, lora=lora).merged()
    acc = E.plain_accuracy(merged, tok, [d], n_per_task=c.eval.n_per_task, split=c.eval.split, registry=reg)
    ppl = E.routed_perplexity(merged, None, None, None, tok, [d], n_per_task=c.eval.n_per_task, registry=reg)
    assert acc[d] == res["per_domain"]["oracle"][d]
    np.testing.assert_allclose(ppl[d], res["perplexity"]["oracle"][d], rtol=1e-4)


def test_domain_expert_command(tiny_base_dir, tmp_path):
  """`configs/moa/expert.py:domain=count` through `launch.train` (60 steps of 32): a LoRA adapter for the
  base, saved on its own, that lifts `count` (held out of the base: 0 %) by at least 15 points
  (measured: 29 %); it loads back for this base, and merged into the weights and exported as an HF
  directory, `launch.eval` re-scores it there to the accuracy the run reported."""
  import subprocess
  import sys
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/moa/expert.py:domain=count",
                         f"--workdir={tmp_path}", f"--config.base_workdir={tiny_base_dir}",
                         "--config.train.steps=60"], cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["domain"] == "count" and res["accuracy"] >= res["base_accuracy"] + 0.15, res
  base = hf.load(Path(tiny_base_dir) / "hf")
  factors, spec, meta = L.load_adapter(tmp_path / "adapter", base.params(), cfg=base.config)
  assert spec.rank == 8 and set(spec.targets) == {"q", "k", "v", "o", "gate", "up", "down"}
  out = L.save_merged(base.config, base.params(), factors, spec.scale, tmp_path / "merged",
                      copy_from=Path(tiny_base_dir) / "hf")
  p = subprocess.run([sys.executable, "-m", "launch.eval", f"--model={out}", "--tasks=count", "--n_per_task=100",
                      f"--workdir={tmp_path / 'rescore'}"], cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert json.loads((tmp_path / "rescore" / "results.json").read_text())["accuracy"]["count"] == res["accuracy"]


def test_domain_expert_on_dataset_files(tiny_base_dir, tmp_path):
  """The same expert from the user's side: `count` examples written as JSONL train / val files (the val
  records from the task's test split), `--config.base=` the base's HF directory, `--config.data.*`. The
  LoRA lifts exact match on the val file by at least 15 points over the base, scored by the method on the
  records; `launch.eval --data` re-scores the base on the same file to the base score the run reported; the
  finished run is not reused for another train file."""
  import subprocess
  import sys

  import numpy as np

  from calm_jax.tasks import get_task
  task, rng = get_task("count"), np.random.default_rng(0)
  for name, split, n in (("train.jsonl", "train", 2000), ("val.jsonl", "test", 100)):
    rows = [task.sample_split(rng, split) for _ in range(n)]
    (tmp_path / name).write_text("".join(json.dumps({"question": e.prompt, "answer": e.answer}) + "\n" for e in rows))
  root = Path(__file__).resolve().parents[1]
  base_hf = Path(tiny_base_dir) / "hf"
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/moa/expert.py", f"--workdir={tmp_path / 'run'}",
         f"--config.base={base_hf}", f"--config.data.train={tmp_path / 'train.jsonl'}",
         f"--config.data.val={tmp_path / 'val.jsonl'}", "--config.data.fields.prompt=question",
         "--config.train.steps=60"]
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert res["split"] == "val" and res["metric"] == "exact" and res["n"] == 100, res
  assert res["accuracy"] >= res["base_accuracy"] + 0.15, res
  p = subprocess.run([sys.executable, "-m", "launch.eval", f"--model={base_hf}", f"--data={tmp_path / 'val.jsonl'}",
                      "--metric=exact", f"--out={tmp_path / 'base_eval'}", '--fields={"prompt": "question"}'],
                     cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads((tmp_path / "base_eval" / "results.json").read_text())["accuracy"] == res["base_accuracy"]
  # The finished run is reused only for the same data: another train file in that workdir is refused.
  (tmp_path / "train.jsonl").write_text("".join((tmp_path / "train.jsonl").read_text().splitlines(True)[:1000]))
  again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert again.returncode == 2 and "trained on other data" in again.stderr and "data.train.blake2b" in again.stderr


def _domain_files(tmp_path, n_train=1500, n_val=60):
  """count and 3-digit addition examples written as one JSONL file per domain (val: the tasks' test split)."""
  from configs.moa.common import TASK_ARGS
  reg, rng = task_registry(TASK_ARGS), np.random.default_rng(0)
  files = {}
  for d in ("count", "addition"):
    for part, split, n in (("train", "train", n_train), ("val", "test", n_val)):
      rows = [reg[d].sample_split(rng, split) for _ in range(n)]
      path = tmp_path / f"{d}_{part}.jsonl"
      path.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in rows))
      files[d, part] = path
  return files


@pytest.mark.slow
def test_moa_suite_on_domain_files(tiny_base_dir, tmp_path):
  """The MoA suite from the user's side: one JSONL file per domain (`--config.data.domains='{name: file}'`,
  val files by `val_domains`), the base by `--config.base`. The file names are the labels: routers trained on
  the union pick each val prompt's domain at the last layer >= 90 % of the time (measured: 100 %); routed with
  no labels, MoA lifts `count` (0 % for the base) by >= 15 points; and the oracle row equals the count expert
  merged into the weights and scored plainly on the same records (another code path: merged weights, no hooks)."""
  import subprocess
  import sys

  from calm_jax.data import read_records
  from calm_jax.evaluate import score_records

  files = _domain_files(tmp_path)
  root = Path(__file__).resolve().parents[1]
  base_hf = Path(tiny_base_dir) / "hf"
  run = tmp_path / "run"
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/moa/suite.py", f"--workdir={run}",
         f"--config.base={base_hf}",
         "--config.data.domains=" + json.dumps({d: str(files[d, "train"]) for d in ("count", "addition")}),
         "--config.data.val_domains=" + json.dumps({d: str(files[d, "val"]) for d in ("count", "addition")}),
         "--config.expert_train.steps=60", "--config.moa.steps=30", "--config.classifier.steps=20",
         "--config.lora.rank=4", "--config.eval.batch_size=64"]
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((run / "results.json").read_text())
  assert res["domains"] == ["addition", "count"] and res["n_val"] == {"addition": 60, "count": 60}, res
  assert res["router_accuracy"][str(len(res["router_accuracy"]) - 1)] >= 0.9, res["router_accuracy"]
  assert res["per_domain"]["moa_layer"]["count"] >= res["base"]["count"] + 0.15, res
  base = hf.load(base_hf)
  tok = load_tokenizer(base_hf)
  factors, spec, _ = L.load_adapter(run / "experts" / "count" / "adapter", base.params(), cfg=base.config)
  merged = L.LoRAModel(base, spec, lora=factors).merged()
  alone = score_records(merged, tok, read_records(files["count", "val"]), "exact", max_len=256, max_new_tokens=64,
                        batch_size=64)[0]["accuracy"]
  assert alone == res["per_domain"]["oracle"]["count"], (alone, res["per_domain"]["oracle"])


def test_moa_suite_domain_file_missing(tmp_path):
  """A domain file that does not exist is named (domain and path) before any model loads or trains (the base
  named here does not exist either); the workdir holds nothing but the run marker every method's workdir gets."""
  from calm_jax.data import DataError
  (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
  c = get_config()
  c.base_workdir = str(tmp_path / "no_base")
  c.data.domains = {"a": str(tmp_path / "a.jsonl"), "b": str(tmp_path / "missing.jsonl")}
  c.data.val_fraction = 0.5
  run = tmp_path / "run"
  with pytest.raises(DataError, match=r"domain 'b' does not exist: .*missing\.jsonl"):
    get_method("moa_suite")(c, run)
  assert [p.name for p in run.iterdir()] == ["calm_jax_run.json"] and not (tmp_path / "no_base").exists()
