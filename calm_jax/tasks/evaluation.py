"""Exact-match evaluation of a generator on task examples.

The generator is injected, so this module needs no model and no jax: in practice it is
`functools.partial(calm_jax.decoding.generate, model, temperature=0.0)`, taking prompts
(bos + prompt ids, unpadded) and returning the new ids of each prompt.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from calm_jax.tasks.base import Example, Task

__all__ = ["evaluate", "make_eval_set", "GenerateFn"]

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


def _task_for(name: str, registry: Mapping[str, Task] | None) -> Task:
  from calm_jax.tasks import get_task

  if registry and name in registry:
    return registry[name]
  return get_task(name)


def evaluate(
  generate_fn: GenerateFn,
  tokenizer,
  examples: Sequence[Example],
  batch_size: int = 64,
  max_new_tokens: int | None = None,
  return_predictions: bool = False,
  registry: Mapping[str, Task] | None = None,
):
  """Accuracy of greedy answers per task and overall.

  Each prompt is `[bos] + encode(prompt)`; `generate_fn(prompts, max_new_tokens)` returns
  the new ids per prompt; they are cut at the first eos, decoded (special ids skipped)
  and checked with the task's `verify` (exact match after stripping).

  `max_new_tokens` defaults to the longest answer (in tokens) among `examples` + 1 for
  the eos.

  Returns `{task: accuracy, ..., "overall": accuracy}` (overall: over all examples), or
  with `return_predictions` a pair `(scores, records)` where records hold one dict per
  example: task, prompt, answer, prediction, correct.
  """
  if not examples:
    raise ValueError("evaluate got no examples")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  eos = tokenizer.eos_id
  if max_new_tokens is None:
    max_new_tokens = max(len(tokenizer.encode(ex.answer)) for ex in examples) + 1

  records = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start : start + batch_size]
    prompts = [bos + tokenizer.encode(ex.prompt) for ex in chunk]
    outputs = generate_fn(prompts, max_new_tokens)
    if len(outputs) != len(chunk):
      raise ValueError(f"generate_fn returned {len(outputs)} sequences for {len(chunk)} prompts")
    for ex, out in zip(chunk, outputs):
      ids = [int(i) for i in out]
      if eos in ids:
        ids = ids[: ids.index(eos)]
      prediction = tokenizer.decode(ids)
      correct = bool(_task_for(ex.task, registry).verify(prediction, ex.answer))
      records.append(
        {"task": ex.task, "prompt": ex.prompt, "answer": ex.answer, "prediction": prediction, "correct": correct}
      )

  totals: dict[str, list[int]] = {}
  for r in records:
    t = totals.setdefault(r["task"], [0, 0])
    t[0] += r["correct"]
    t[1] += 1
  scores = {task: c / n for task, (c, n) in totals.items()}
  scores["overall"] = sum(r["correct"] for r in records) / len(records)
  return (scores, records) if return_predictions else scores


def make_eval_set(
  tasks: Sequence[str],
  n_per_task: int,
  split: str = "test",
  seed: int = 0,
  registry: Mapping[str, Task] | None = None,
  domains: Sequence[str] | None = None,
) -> list[Example]:
  """`n_per_task` distinct examples of each task from `split`, labelled with domain ids
  (index in `domains`, default the sorted task names, as in `Mixture`).

  `n_per_task` is capped at the task's `num_prompts` where it is small and known (kv_lookup).
  """
  domains = tuple(sorted(tasks)) if domains is None else tuple(domains)
  out = []
  for name in tasks:
    task = _task_for(name, registry)
    n = n_per_task if task.num_prompts is None else min(n_per_task, task.num_prompts)
    if name not in domains:
      raise ValueError(f"task {name!r} is not in domains {domains}")
    d = domains.index(name)
    out += [Example(ex.prompt, ex.answer, ex.task, d) for ex in task.split(split, n, seed)]
  return out
