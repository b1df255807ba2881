"""The embedded default base: a small llama-family decoder trained on the synthetic suite.

Every method's demo starts from this base (`DIR/hf`). A workdir with a finished base is
reused (config.reuse), so `make demo` trains it once.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from calm_jax import hf, sharding
from calm_jax.experiment import (bar_chart, build_decoder, majority_baseline, print_table, suite_accuracy,
                                 write_results)
from calm_jax.registry import register_method
from calm_jax.tasks import Mixture, get_task, max_seq_len
from calm_jax.tokenizers import CharTokenizer
from calm_jax.train import lm_loss, train


def lm_batch_loss(model, batch, rng):
  """Next-token loss on answer tokens; the model sees right-padded rows."""
  logits = model(batch["inputs"], batch["attention_mask"])
  return lm_loss(logits, batch["targets"], batch["loss_mask"])


def task_registry(config) -> dict:
  """Tasks configured by `config.data.task_args` ({task: {argument: value}}), e.g. fewer digits."""
  args = config.data.get("task_args", None) or {}
  return {name: get_task(name, **dict(kw)) for name, kw in dict(args).items()}


def mixture_batches(config, tokenizer, seq_len=None):
  mixture = Mixture(dict(config.data.tasks), seed=int(config.seed), registry=task_registry(config))
  seq_len = seq_len or int(config.data.get("seq_len", 0)) or max_seq_len(list(mixture.tasks.values()))
  return mixture, seq_len, lambda step: mixture.batch(step, int(config.batch_size), tokenizer, seq_len)


def base_hf_dir(base_workdir, fallback=None, variant: str = "") -> Path:
  """The embedded base's HF directory BASE/hf, BASE = `base_workdir` or else `fallback`; a missing base
  is trained there first (configs/pretrain.py, `variant` e.g. "tiny"). What every method experiment
  starts from."""
  from configs.pretrain import get_config
  if not base_workdir and fallback is None:
    raise ValueError("no base: set config.base_workdir (e.g. runs/demo/base)")
  root = Path(base_workdir) if base_workdir else Path(fallback)
  if not (root / "hf" / "config.json").exists():
    run(get_config(variant or None), root)
  return root / "hf"


@register_method("pretrain")
def run(config, workdir) -> dict:
  workdir = Path(workdir)
  results_path = workdir / "results.json"
  hf_dir = workdir / "hf"
  if config.get("reuse", False) and results_path.exists() and (hf_dir / "config.json").exists():
    print(f"reusing the finished base in {hf_dir}")
    return json.loads(results_path.read_text())
  t0 = time.time()
  tokenizer = CharTokenizer()
  tasks = [t for t, w in dict(config.data.tasks).items() if w > 0]
  registry = task_registry(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.get("rules", ()))
  model = build_decoder(config.model, tokenizer, int(config.seed), mesh=mesh, rules=rules)
  _, _, batch_fn = mixture_batches(config, tokenizer)

  def eval_fn(m, step):
    acc = suite_accuracy(m, tokenizer, tasks, n_per_task=min(50, config.eval.n_per_task), split="val",
                         batch_size=config.eval.batch_size, registry=registry)
    return {"val_accuracy": acc["overall"]}

  result = train(model, loss_fn=lm_batch_loss, batch_fn=batch_fn, config=config, workdir=workdir, mesh=mesh,
                 eval_fn=eval_fn, meta={"model": json.dumps(dict(config.model), sort_keys=True)})
  acc = suite_accuracy(result.model, tokenizer, tasks, n_per_task=config.eval.n_per_task,
                       split=config.eval.split, batch_size=config.eval.batch_size, registry=registry)
  if jax.process_index() == 0:
    hf.save(result.model, hf_dir, overwrite=True, max_shard_size="2GB")
    tokenizer.save(hf_dir)
  chance = majority_baseline(tasks, n_per_task=config.eval.n_per_task, split=config.eval.split, registry=registry)
  out = {"accuracy": acc, "chance": chance, "seconds": time.time() - t0, "steps": result.step,
         "final_loss": result.metrics.get("loss"),
         "params": int(sum(np.size(x) for x in jax.tree.leaves(result.model.params())))}
  write_results(workdir, out)
  bar_chart(workdir / "results.png", {"base": {k: v for k, v in acc.items() if k != "overall"},
                                      "chance (majority answer)": chance},
            f"tiny base ({out['params']:,} params): test exact-match accuracy")
  print_table("tiny base, test accuracy (%)", {"base": acc, "chance (majority answer)": chance})
  print(f"results: {results_path}  chart: {workdir / 'results.png'}  model: {hf_dir}")
  return out
