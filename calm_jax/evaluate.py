"""Evaluate a saved HF checkpoint on the synthetic suite (what launch/eval.py calls).

A checkpoint trained on the suite records the task settings it learned (`tasks.TASK_SETTINGS_FILE`,
e.g. 2-digit addition for the tiny base); they are what its tasks are scored on unless `task_args`
says otherwise, so a score is never of a task the model was not trained on by accident.
"""
from __future__ import annotations

from calm_jax import hf
from calm_jax.experiment import print_table, suite_accuracy, write_results
from calm_jax.tasks import TASK_SETTINGS_FILE, TASKS, load_task_settings, task_registry
from calm_jax.tokenizers import load_tokenizer


def evaluate_checkpoint(model_dir, *, tasks=None, n_per_task=200, split="test", workdir=None,
                        batch_size=256, task_args=None) -> dict:
  """Exact-match accuracy per task of the model in `model_dir`; `task_args` ({task: {arg: value}})
  override the recorded settings task by task."""
  model = hf.load(model_dir)
  tokenizer = load_tokenizer(model_dir)
  settings = load_task_settings(model_dir)
  args = {**(settings or {}).get("task_args", {}), **dict(task_args or {})}
  if settings is not None:
    print(f"task settings from {model_dir}/{TASK_SETTINGS_FILE}: {settings['task_args'] or 'defaults'}")
  tasks = list(tasks or TASKS)
  acc = suite_accuracy(model, tokenizer, tasks, n_per_task=n_per_task, split=split, batch_size=batch_size,
                       registry=task_registry(args))
  print_table(f"{model_dir} on the {split} split (%)", {"model": acc})
  if workdir:
    write_results(workdir, {"accuracy": acc, "model": str(model_dir), "split": split, "task_args": args})
  return acc
