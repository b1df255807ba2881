"""The merging experiment on one's own fine-tunes and eval files (`configs/merge/suite.py` with `config.models`).

  python -m launch.train --config=configs/merge/suite.py --workdir=DIR --config.base=BASE \\
      --config.models='{"math": "ft_math", "code": "ft_code"}' \\
      --config.data.eval='{"math": "math_val.jsonl", "code": "code_val.jsonl"}' [--config.eval.metric=number]

Every input is checked before any model is scored or merged, and a bad one is named (the task, the
file or directory): a model or an eval file missing, a task with a model but no eval file or the other
way round, a fine-tune whose tensors differ from the base's, a record the metric cannot score, a
workdir that overlaps an input. Each eval file is read with `calm_jax.data`, prompts laid out with the
base's tokenizer (its chat template when it has one), and split into validation records (a seeded
`data.val_fraction`, or the file `data.val[task]`), on which task arithmetic's λ is chosen, and test
records, on which the table is reported (`calm_jax.evaluate.score_records` under `eval.metric`).
The base, each fine-tune and each merge are rows; the merges are the synthetic suite's
(`merging.suite.merge_and_score`). Only DIR is written: results.json, results.png, predictions/ROW.jsonl
(one line per test record: task, source file:line, generated, reference, score) and, with
`merge.keep`, the merged HF directories in DIR/merged.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

from calm_jax import hf
from calm_jax.atomic import OutputError, atomic_dir, same_or_nested
from calm_jax.data import DataError, Record, encode_prompt, named_files, read_records, split_records
from calm_jax.errors import UserError
from calm_jax.evaluate import check_metric, score_records
from calm_jax.hub import model_dir
from calm_jax.tokenizers import load_tokenizer
from calm_jax.train.workdir import RUN_FILE
from merging.engine import plan
from merging.options import MergeError, resolve_checked
from merging.stream import CheckpointSource, check_architectures
from merging.suite import merge_and_score, merge_specs, report, row_dirname

METRICS = ("exact", "number", "choice")  # an accuracy per task: what normalized accuracy divides


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One task's eval records: `val` chooses λ, `test` is reported."""

  file: str
  val_file: str | None   # data.val[task], when given
  val_from: str          # the val file, or "val_fraction=F of FILE"
  val: list[Record]
  test: list[Record]


def _same_tasks(tasks: list[str], other: dict, key: str, what: str) -> None:
  extra = sorted(set(other) - set(tasks))
  if extra:
    raise UserError(f"config.{key} has task(s) {extra} with no model in config.models (its tasks: {tasks}); "
                    f"give each {what} a model, or remove it")
  missing = [t for t in tasks if t not in other]
  if missing:
    raise UserError(f"config.models has task(s) {missing} with no {what} in config.{key}; give one each")


def read_task_data(config, tasks: list[str]) -> dict[str, TaskData]:
  """Every task's eval records, read, checked against the metric and split into val and test."""
  d, metric = config.data, config.eval.metric
  evals, vals = named_files(d.eval, "data.eval"), named_files(d.val, "data.val")
  _same_tasks(tasks, evals, "data.eval", "eval file")
  if vals:
    _same_tasks(tasks, vals, "data.val", "validation file")
  fraction = float(d.val_fraction or 0.0)
  fields = dict(d.fields.to_dict() if hasattr(d.fields, "to_dict") else d.fields or {})

  def read(task, path, key):
    try:
      records = read_records(path, format=d.format, fields=fields)
      check_metric(records, metric)
    except DataError as e:
      raise DataError(f"config.{key}[{task!r}]: {e}") from None
    return records

  out = {}
  for task in tasks:
    records = read(task, evals[task], "data.eval")
    if vals:
      val, test, val_from = read(task, vals[task], "data.val"), records, vals[task]
    elif fraction:
      try:
        test, val = split_records(records, fraction, int(d.seed))
      except DataError as e:
        raise DataError(f"config.data.eval[{task!r}] ({evals[task]}): {e}") from None
      val_from = f"val_fraction={fraction:g} of {evals[task]}"
    else:
      test, val, val_from = records, [], ""
    out[task] = TaskData(evals[task], vals.get(task), val_from, val, test)
  return out


def check_models(base: Path, models: dict[str, Path]) -> None:
  """Each fine-tune has the base's architecture, tensor names and shapes (the merge engine's own plan, from
  the safetensors headers only), else a `MergeError` naming the task and its directory."""
  opts = resolve_checked("task_arithmetic", 1, {})
  for task, d in models.items():
    try:
      check_architectures(base, [d])
      source = CheckpointSource(base, [d], direct=False)
      try:
        plan(source, opts)
      finally:
        source.close()
    except (MergeError, UserError) as e:
      raise MergeError(f"config.models[{task!r}] ({d}) does not fit the base {base}: {e}") from None


OUTPUTS = ("merged", "predictions", "results.json", "results.png")  # what the run writes in its workdir


def check_workdir_apart(workdir: Path, inputs: dict[str, object]) -> None:
  """No output of the run (`OUTPUTS` in the workdir) is, holds or lies inside an input. A refused workdir
  that holds nothing but the run marker the entry point just wrote is removed: nothing stays behind."""
  for what, path in inputs.items():
    if any(same_or_nested(workdir / name, path) for name in OUTPUTS):
      if sorted(p.name for p in workdir.iterdir()) == [RUN_FILE]:
        (workdir / RUN_FILE).unlink()
        workdir.rmdir()
      raise OutputError(f"--workdir {workdir} overlaps {what} ({path}); nothing was written: choose a workdir "
                        "apart from the models and data")


class FileScorer:
  """score(row, model directory, split, tasks) -> {task: accuracy} on the tasks' val or test records; keeps
  every test record's prediction per row for predictions/ROW.jsonl."""

  def __init__(self, config, tokenizer, data: dict[str, TaskData]):
    self.config, self.tokenizer, self.data = config, tokenizer, data
    self.predictions: dict[str, list[dict]] = {}

  def __call__(self, row: str, directory, split: str, tasks=None) -> dict:
    ev, d = self.config.eval, self.config.data
    model = hf.load(directory)
    acc = {}
    for task in tasks or self.data:
      records = getattr(self.data[task], split)
      results, rows = score_records(model, self.tokenizer, records, ev.metric, chat_template=d.chat_template,
                                    max_len=int(d.max_len), max_new_tokens=int(ev.max_new_tokens),
                                    batch_size=int(ev.batch_size))
      acc[task] = results["accuracy"]
      if split == "test":
        self.predictions.setdefault(row, []).extend(
            {"task": task, "source": r.source, **{k: v for k, v in x.items() if k != "logliks"}}
            for r, x in zip(records, rows))
    return acc

  def write(self, out: Path) -> None:
    """predictions/ROW.jsonl for every scored row, written as one directory (atomic)."""
    with atomic_dir(out, overwrite=True) as tmp:
      for row, preds in self.predictions.items():
        (tmp / f"{predictions_name(row)}.jsonl").write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))


def predictions_name(row: str) -> str:
  """The file name (no suffix) of a row's predictions: "task_arithmetic λ=0.2" -> "task_arithmetic_lam0.2"."""
  return re.sub(r"[^\w.+=-]", "_", row_dirname(row))


def run_on_files(config, workdir) -> dict:
  """The merge suite's table for `config.models` on `config.data.eval` (the module docstring); every check first."""
  t0 = time.time()
  workdir = Path(workdir).absolute()
  ev = config.eval
  if ev.metric not in METRICS:
    raise UserError(f"eval.metric={ev.metric!r}: the merging table is of accuracies; expected one of {METRICS}")
  if int(config.data.max_len) <= int(ev.max_new_tokens):
    raise UserError(f"data.max_len={config.data.max_len} leaves no room for a prompt before "
                    f"eval.max_new_tokens={ev.max_new_tokens}")
  if not config.base:
    raise UserError("config.models is set but config.base is not: give the model the fine-tunes were made from "
                    "(a directory, a fetched name or a Hub id)")
  refs = named_files(config.models, "config.models")
  tasks = list(refs)
  data = read_task_data(config, tasks)
  try:
    base = model_dir(config.base)
  except UserError as e:
    raise type(e)(f"config.base: {e}") from None
  models = {}
  for task, ref in refs.items():
    try:
      models[task] = model_dir(ref)
    except UserError as e:
      raise type(e)(f"config.models[{task!r}]: {e}") from None
  check_workdir_apart(workdir, {"config.base": base, **{f"config.models[{t!r}]": d for t, d in models.items()},
                                **{f"config.data.eval[{t!r}]": v.file for t, v in data.items()},
                                **{f"config.data.val[{t!r}]": v.val_file for t, v in data.items() if v.val_file}})
  check_models(base, models)
  tokenizer = load_tokenizer(base)
  prompt_len = int(config.data.max_len) - int(ev.max_new_tokens)
  for task, v in data.items():  # a record that cannot be laid out fails now, not after minutes of scoring
    for r in v.val + v.test:
      encode_prompt(r, tokenizer, chat_template=config.data.chat_template, max_len=prompt_len)

  score = FileScorer(config, tokenizer, data)
  grid = any(method == "task_arithmetic" for method, _ in merge_specs(config).values())
  choose_lam = grid and all(v.val for v in data.values())
  base_acc = score("base", base, "test")
  ft_acc = {t: score(f"fine-tuned on {t}", d, "test") for t, d in models.items()}
  finetuned = {t: ft_acc[t][t] for t in tasks}
  finetuned_val = {t: score(f"fine-tuned on {t}", d, "val", [t])[t] for t, d in models.items()} if choose_lam else None
  merged, lambdas, selected = merge_and_score(config, base, models, workdir, score, finetuned_val,
                                              keep=bool(config.merge.keep))
  score.write(workdir / "predictions")
  out = {"finetuned": finetuned, "merged": merged, "base": base_acc, "finetuned_all": ft_acc,
         "metagpt_lambdas": lambdas, "selected_lambda": selected, "tasks": tasks, "metric": ev.metric,
         "base_model": str(base), "models": {t: str(d) for t, d in models.items()},
         "eval": {t: {"file": v.file, "val": v.val_from, "n_val": len(v.val), "n_test": len(v.test)}
                  for t, v in data.items()},
         "seconds": time.time() - t0}
  return report(workdir, out, f"merging {len(tasks)} fine-tunes of {config.base}",
                f"merging {len(tasks)} fine-tunes of {config.base}: normalized accuracy")
