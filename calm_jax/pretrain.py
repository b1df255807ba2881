"""The embedded default base ("pretrain"): a small llama-family decoder trained on the synthetic suite.

Every method's demo starts from this base (`DIR/hf`), found (and trained first if missing) by
`base_hf_dir` with the pretraining config its caller hands over. A workdir with a finished base is
reused (config.reuse), so `make demo` trains it once. The HF directory records the task settings
the base learned (`calm_jax.tasks.TASK_SETTINGS_FILE`), so `launch.eval` scores it on those.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from calm_jax import hf, sharding
from calm_jax.experiment import (bar_chart, build_decoder, majority_baseline, print_table, suite_accuracy,
                                 write_results)
from calm_jax.registry import register_method
from calm_jax.tasks import TASK_SETTINGS_FILE, mixture_batches, task_registry, task_settings
from calm_jax.tokenizers import CharTokenizer
from calm_jax.train import lm_batch_loss, train
from calm_jax.train.workdir import check_finished


def base_hf_dir(base_workdir, pretrain_config, fallback=None) -> Path:
  """The embedded base's HF directory ROOT/hf, ROOT = `base_workdir` or else `fallback`; a missing
  base is trained there first with `pretrain_config` (configs/pretrain.py, which method configs carry
  as `config.pretrain`). What every method experiment starts from."""
  if not base_workdir and fallback is None:
    raise ValueError("no base: set config.base_workdir (e.g. runs/demo/base)")
  root = Path(base_workdir) if base_workdir else Path(fallback)
  if not (root / "hf" / "config.json").exists():
    run(pretrain_config, root)
  return root / "hf"


@register_method("pretrain")
def run(config, workdir) -> dict:
  workdir = Path(workdir)
  results_path = workdir / "results.json"
  hf_dir = workdir / "hf"
  if config.reuse and results_path.exists() and (hf_dir / "config.json").exists():
    check_finished(workdir, config, "base")  # the same config, or refused naming what differs
    print(f"reusing the finished base in {hf_dir}")
    return json.loads(results_path.read_text())
  t0 = time.time()
  tokenizer = CharTokenizer()
  tasks = [t for t, w in dict(config.data.tasks).items() if w > 0]
  registry = task_registry(config.data.task_args)
  mesh = sharding.make_mesh(config.mesh, batch_size=int(config.batch_size))
  rules = sharding.rules_from_config(config.rules)
  model = build_decoder(config.model, tokenizer, int(config.seed), mesh=mesh, rules=rules)
  _, _, batch_fn = mixture_batches(config.data.tasks, batch_size=config.batch_size, tokenizer=tokenizer,
                                   seed=int(config.seed), registry=registry, seq_len=config.data.seq_len)

  def eval_fn(m, step):
    acc = suite_accuracy(m, tokenizer, tasks, n_per_task=min(50, config.eval.n_per_task), split="val",
                         batch_size=config.eval.batch_size, registry=registry)
    return {"val_accuracy": acc["overall"]}

  result = train(model, trainable=nnx.Param, loss_fn=lm_batch_loss, batch_fn=batch_fn, config=config,
                 workdir=workdir, mesh=mesh, eval_fn=eval_fn,
                 meta={"model": json.dumps(dict(config.model), sort_keys=True)})
  acc = suite_accuracy(result.model, tokenizer, tasks, n_per_task=config.eval.n_per_task,
                       split=config.eval.split, batch_size=config.eval.batch_size, registry=registry)
  if jax.process_index() == 0:
    hf.save(result.model, hf_dir, overwrite=True, max_shard_size="2GB", tokenizer=tokenizer,
            extra_files={TASK_SETTINGS_FILE: task_settings(config.data.tasks, config.data.task_args)})
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
