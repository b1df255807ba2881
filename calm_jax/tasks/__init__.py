"""The synthetic task suite: the embedded default every method trains and evaluates on.

`TASKS` maps task names to default-configured task objects; `get_task(name, **kwargs)`
returns the default or a re-configured one, `task_registry(task_args)` the tasks a config
re-configures. See `calm_jax.tasks.suite` for the prompt formats, `Mixture`/`encode_batch`/
`mixture_batches` for training data and `evaluate` for exact-match scores. A model trained on the
suite records its task settings beside its weights, so evaluating it later
uses the tasks it learned (`task_settings`, `load_task_settings`).
"""

from __future__ import annotations

import json
from pathlib import Path

from calm_jax.tasks.base import SPLIT_FRACTIONS, SPLITS, Example, Interleaved, Task, split_of
from calm_jax.tasks.data import Mixture, encode_batch, mixture_batches
from calm_jax.tasks.evaluation import evaluate, make_eval_set
from calm_jax.tasks.suite import (
  Addition,
  Copy,
  Count,
  KVLookup,
  KVMap,
  Max,
  Reverse,
  Sort,
  Subtraction,
  Uppercase,
)

__all__ = [
  "TASKS",
  "get_task",
  "task_registry",
  "max_seq_len",
  "TASK_SETTINGS_FILE",
  "task_settings",
  "load_task_settings",
  "Example",
  "Task",
  "Interleaved",
  "SPLITS",
  "SPLIT_FRACTIONS",
  "split_of",
  "Mixture",
  "encode_batch",
  "mixture_batches",
  "evaluate",
  "make_eval_set",
  "KVMap",
]

TASKS: dict[str, Task] = {
  t.name: t
  for t in (
    Addition(),
    Subtraction(),
    KVLookup(),
    Reverse(),
    Sort(),
    Copy(),
    Count(),
    Max(),
    Uppercase(),
  )
}


def get_task(name: str, **kwargs) -> Task:
  """The registered task `name`; with keyword arguments, a new instance of its class
  configured by them (e.g. `get_task("kv_lookup", n_keys=128)`)."""
  try:
    task = TASKS[name]
  except KeyError:
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
  return type(task)(**kwargs) if kwargs else task


def max_seq_len(task_names, bos: bool = True) -> int:
  """Longest `[bos] + prompt + answer + [eos]` of these tasks with the character tokenizer
  (one token per character): a safe `seq_len` for `encode_batch`."""
  tasks = [t if isinstance(t, Task) else get_task(t) for t in task_names]
  if not tasks:
    raise ValueError("max_seq_len needs at least one task")
  return max(int(bos) + t.max_prompt_chars + t.max_answer_chars + 1 for t in tasks)


def task_registry(task_args) -> dict[str, Task]:
  """Tasks re-configured by `{task: {argument: value}}` (a config's `data.task_args`), e.g.
  `{"addition": {"max_digits": 2}}`; every other task keeps its default."""
  return {name: get_task(name, **dict(kw)) for name, kw in dict(task_args or {}).items()}


# Written into the HF directory of a model trained on the suite (and copied along by `hf.save(copy_from=)`
# and the merge): which tasks it learned and with which arguments.
TASK_SETTINGS_FILE = "task_settings.json"


def task_settings(tasks, task_args) -> dict:
  """What a model trained on the suite records in its HF directory as TASK_SETTINGS_FILE: the mixture
  `{task: weight}` and the `task_args` it was trained with."""
  return {"tasks": {k: float(v) for k, v in dict(tasks).items()},
          "task_args": {k: dict(v) for k, v in dict(task_args or {}).items()}}


def load_task_settings(model_dir) -> dict | None:
  """`{"tasks": {...}, "task_args": {...}}` recorded in `model_dir`, or None when it holds none."""
  path = Path(model_dir) / TASK_SETTINGS_FILE
  if not path.exists():
    return None
  try:
    settings = json.loads(path.read_text())
    if not isinstance(settings.get("task_args"), dict) or not isinstance(settings.get("tasks"), dict):
      raise ValueError("needs the objects 'tasks' and 'task_args'")
  except (ValueError, AttributeError) as e:
    raise ValueError(f"{path}: corrupt task settings ({e})") from None
  return settings
