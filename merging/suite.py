"""The merging experiment ("merge_suite"): fine-tune the tiny base once per task, merge the
fine-tuned models with every method, score every merged model on every task.

  python -m launch.train --config=configs/merge/suite.py --workdir=DIR

Steps (each reused when its output exists in DIR, so a rerun only does what is missing):
  1. the base: `config.base_workdir/hf`, trained there by the pretrain method if it is missing;
  2. one full fine-tune per task (`trainable=["Param"]`, the shared trainer) -> DIR/finetuned/TASK/hf;
  3. every merge of `merge_specs(config)` through the streaming merge -> DIR/merged/NAME;
  4. exact-match accuracy of base, fine-tuned and merged models on every task; the normalized
     accuracy of a merge is mean_t acc_merged(t) / acc_finetuned_t(t) (MetaGPT paper, Table 1),
     over the tasks whose fine-tuned accuracy is > 0;
  5. task arithmetic's λ chosen as a practitioner would: the grid point with the best normalized
     accuracy on the *validation* split, reported on the test split ("task_arithmetic (val λ)").
     MetaGPT needs no such search: that is its point.
Writes DIR/results.json {"finetuned", "merged", "normalized", "average", "selected_lambda", ...},
DIR/results.png, and prints the table.

With `config.models` ({task: model}) the fine-tunes are the user's and the tasks their eval files
(`config.data.eval`): steps 1-2 are skipped and scoring is `merging.suite_files`'.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np
from flax import nnx

from calm_jax import hf
from calm_jax.errors import UserError
from calm_jax.experiment import bar_chart, print_table, suite_accuracy, write_results
from calm_jax.pretrain import base_hf_dir
from calm_jax.registry import register_method
from calm_jax.tasks import mixture_batches, task_registry
from calm_jax.tokenizers import load_tokenizer
from calm_jax.train import lm_batch_loss, train
from calm_jax.train.workdir import check_finished
from merging.stream import REPORT_NAME, merge_checkpoints

# score(row name, model directory, split) -> {task: accuracy}
Scorer = Callable[[str, Path, str], dict]


def normalized_accuracy(merged: dict, finetuned: dict) -> float:
  """mean over tasks of merged[t] / finetuned[t] (tasks whose fine-tuned accuracy is 0 are skipped)."""
  ratios = [merged[t] / finetuned[t] for t in finetuned if finetuned[t] > 0]
  return float(np.mean(ratios)) if ratios else 0.0


def merge_specs(config) -> dict[str, tuple[str, dict]]:
  """{row name: (method, options)}: the λ grid of task arithmetic and every other method."""
  m = config.merge
  specs = {"average": ("average", {})}
  for lam in m.lambdas:
    specs[f"task_arithmetic λ={lam:g}"] = ("task_arithmetic", {"lam": float(lam)})
  specs.update({
      "ties": ("ties", {"density": m.density}),
      f"dare λ={m.dare_lam:g}": ("dare", {"drop_rate": m.drop_rate, "lam": m.dare_lam, "seed": int(config.seed)}),
      "metagpt": ("metagpt", {}),
      "metagpt+ties": ("metagpt", {"sparsify": "ties", "density": m.density}),
      "metagpt+dare": ("metagpt", {"sparsify": "dare", "drop_rate": m.drop_rate, "seed": int(config.seed)}),
  })
  wanted = lambda row: any(row == w or row.startswith(w + " ") for w in m.methods)  # "task_arithmetic": its grid
  return {k: v for k, v in specs.items() if not m.methods or wanted(k)}


def row_dirname(row: str) -> str:
  """The directory (under DIR/merged) of a merge row: "task_arithmetic λ=0.2" -> "task_arithmetic_lam0.2"."""
  return row.replace(" ", "_").replace("λ=", "lam")


def finetune(config, base_hf: Path, task: str, workdir: Path, tokenizer, registry) -> Path:
  """Full fine-tune of the base on one task (every nnx.Param trains); returns its HF directory, which
  carries the base's tokenizer and task settings."""
  out = workdir / "finetuned" / task
  c = ml_collections.ConfigDict(config.finetune.to_dict())
  c.seed = int(config.seed)
  if (out / "hf" / "config.json").exists():
    check_finished(out, c, "fine-tune")
    return out / "hf"
  _, _, batch_fn = mixture_batches({task: 1.0}, batch_size=c.batch_size, tokenizer=tokenizer, seed=c.seed,
                                   registry=registry)
  result = train(hf.load(base_hf), trainable=nnx.Param, loss_fn=lm_batch_loss, batch_fn=batch_fn, config=c,
                 workdir=out, quiet=True)
  hf.save(result.model, out / "hf", overwrite=True, copy_from=base_hf)
  return out / "hf"


def merge_and_score(config, base_hf: Path, ft_dirs: dict[str, Path], workdir: Path, score: Scorer,
                    finetuned_val: dict | None, keep: bool) -> tuple[dict, dict, dict | None]:
  """Every merge of `merge_specs` into DIR/merged/NAME, scored on the test split (task arithmetic's grid
  also on val, against `finetuned_val`, to choose λ); the merged directories are removed unless `keep`.
  Returns (merged {row: {task: acc}}, MetaGPT λ's {row: [λ_t]}, selected λ or None)."""
  tasks = list(ft_dirs)
  specs = merge_specs(config)
  grid = {name: opts["lam"] for name, (method, opts) in specs.items() if method == "task_arithmetic"}
  merged, reports, val_normalized = {}, {}, {}
  for name, (method, opts) in specs.items():
    out = workdir / "merged" / row_dirname(name)
    merge_checkpoints(base_hf, [ft_dirs[t] for t in tasks], out, method, overwrite=True, progress=False,
                      mesh=config.merge.mesh or None, **opts)
    merged[name] = score(name, out, "test")
    if name in grid and finetuned_val is not None:
      val_normalized[name] = normalized_accuracy(score(name, out, "val"), finetuned_val)
    lambdas = json.loads((out / REPORT_NAME).read_text()).get("lambdas")
    if lambdas:
      reports[name] = lambdas
    if not keep:
      shutil.rmtree(out)
  if not keep and (workdir / "merged").is_dir() and not any((workdir / "merged").iterdir()):
    (workdir / "merged").rmdir()
  selected = None
  if val_normalized:
    best = max(val_normalized, key=lambda k: (val_normalized[k], -grid[k]))  # ties: the smaller λ
    selected = {"row": best, "lam": grid[best], "val_normalized": val_normalized}
    merged["task_arithmetic (val λ)"] = merged[best]
  return merged, reports, selected


def report(workdir: Path, out: dict, title: str, chart_title: str) -> dict:
  """Adds normalized and average accuracies to `out` ({"tasks", "base", "finetuned", "finetuned_all",
  "merged", "selected_lambda", ...}), writes results.json and results.png, prints the table."""
  tasks, merged, finetuned, ft_acc = out["tasks"], out["merged"], out["finetuned"], out["finetuned_all"]
  out["normalized"] = {name: normalized_accuracy(acc, finetuned) for name, acc in merged.items()}
  rows = {"base": out["base"], "fine-tuned (own task)": finetuned,
          **{f"fine-tuned on {t}": ft_acc[t] for t in tasks}, **merged}
  out["average"] = {name: float(np.mean([acc[t] for t in tasks])) for name, acc in rows.items()}
  write_results(workdir, out)
  table = {name: {**acc, "overall": out["average"][name],
                  **({"normalized": out["normalized"][name]} if name in merged else {})}
           for name, acc in rows.items()}
  print_table(f"{title}: test accuracy (%), overall = mean over tasks, normalized = merged / fine-tuned", table)
  bar_chart(workdir / "results.png", {"normalized accuracy": out["normalized"]}, chart_title,
            ylabel="merged / fine-tuned")
  if out.get("selected_lambda"):
    print(f"task arithmetic: λ={out['selected_lambda']['lam']:g} selected on the validation split")
  print(f"results: {workdir / 'results.json'}  chart: {workdir / 'results.png'}  ({out['seconds']:.0f} s)")
  return out


@register_method("merge_suite")
def run(config, workdir) -> dict:
  if config.models:
    from merging.suite_files import run_on_files
    return run_on_files(config, workdir)
  if config.data.eval or config.data.val:
    raise UserError("config.data.eval / data.val are set but config.models is not: give {task: fine-tuned model} "
                    "for the eval files (or leave both empty for the synthetic suite)")
  t0 = time.time()
  workdir = Path(workdir)
  base_hf = base_hf_dir(config.base_workdir, config.pretrain, fallback=workdir / "base")
  tokenizer = load_tokenizer(base_hf)
  registry = task_registry(config.data.task_args)
  tasks = list(config.tasks)
  ev = config.eval

  def score(name, model_dir, split=ev.split) -> dict:
    del name
    acc = suite_accuracy(hf.load(model_dir), tokenizer, tasks, n_per_task=ev.n_per_task,
                         split=ev.split if split == "test" else split, batch_size=ev.batch_size, registry=registry)
    return {t: acc[t] for t in tasks}

  ft_dirs = {}
  for task in tasks:
    t = time.time()
    ft_dirs[task] = finetune(config, base_hf, task, workdir, tokenizer, registry)
    print(f"fine-tuned on {task}: {ft_dirs[task]} ({time.time() - t:.0f} s)")
  base_acc = score("base", base_hf)
  ft_acc = {task: score(task, d) for task, d in ft_dirs.items()}
  finetuned = {task: ft_acc[task][task] for task in tasks}
  has_grid = any(m == "task_arithmetic" for m, _ in merge_specs(config).values())
  finetuned_val = {task: score(task, d, "val")[task] for task, d in ft_dirs.items()} if has_grid else None
  merged, reports, selected = merge_and_score(config, base_hf, ft_dirs, workdir, score, finetuned_val,
                                              keep=config.merge.keep is not False)
  out = {"finetuned": finetuned, "merged": merged, "base": base_acc, "finetuned_all": ft_acc,
         "metagpt_lambdas": reports, "selected_lambda": selected, "seconds": time.time() - t0, "tasks": tasks}
  return report(workdir, out, "merging the per-task fine-tunes",
                f"merging {len(tasks)} fine-tunes of the tiny base: normalized accuracy")
