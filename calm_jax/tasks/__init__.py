"""The synthetic task suite: the embedded default every method trains and evaluates on.

`TASKS` maps task names to default-configured task objects; `get_task(name, **kwargs)`
returns the default or a re-configured one. See `calm_jax.tasks.suite` for the prompt
formats, `Mixture`/`encode_batch` for training data and `evaluate` for exact-match scores.
"""

from __future__ import annotations

from calm_jax.tasks.base import SPLIT_FRACTIONS, SPLITS, Example, Interleaved, Task, split_of
from calm_jax.tasks.data import Mixture, encode_batch
from calm_jax.tasks.evaluation import evaluate, make_eval_set
from calm_jax.tasks.suite import (
  Addition,
  Copy,
  Count,
  KVArithmetic,
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
  "max_seq_len",
  "Example",
  "Task",
  "Interleaved",
  "SPLITS",
  "SPLIT_FRACTIONS",
  "split_of",
  "Mixture",
  "encode_batch",
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
    KVArithmetic(),
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
