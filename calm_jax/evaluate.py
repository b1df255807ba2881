"""Evaluate a saved HF checkpoint on the synthetic suite (what launch/eval.py calls)."""
from __future__ import annotations

from calm_jax import hf
from calm_jax.experiment import print_table, suite_accuracy, write_results
from calm_jax.tasks import TASKS
from calm_jax.tokenizers import load_tokenizer


def evaluate_checkpoint(model_dir, *, tasks=None, n_per_task=200, split="test", workdir=None,
                        batch_size=256) -> dict:
  model = hf.load(model_dir)
  tokenizer = load_tokenizer(model_dir)
  tasks = list(tasks or [t for t in TASKS if t != "kv_arithmetic"])
  acc = suite_accuracy(model, tokenizer, tasks, n_per_task=n_per_task, split=split, batch_size=batch_size)
  print_table(f"{model_dir} on the {split} split (%)", {"model": acc})
  if workdir:
    write_results(workdir, {"accuracy": acc, "model": str(model_dir), "split": split})
  return acc
