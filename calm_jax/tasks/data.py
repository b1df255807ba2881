"""Task mixtures with domain labels, and examples -> padded numpy batches.

`Mixture` is stateless: example `i` is a pure function of `(seed, i)`, and batch `step` is
examples `[step*B, (step+1)*B)`. A resumed run therefore sees exactly the data an
uninterrupted run would, with the step as the only data position to checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from calm_jax.data.batches import pack_batch
from calm_jax.tasks.base import SPLITS, Example, Task

__all__ = ["Mixture", "encode_batch", "mixture_batches"]


class Mixture:
  """Examples from several tasks with per-task weights, labelled with `domain_id`.

  Args:
   tasks: {task name: weight} (weights >= 0, normalised here; a weight of 0 keeps a task's
    domain id reserved, e.g. a task held out for Transformer² evaluation), or a
    sequence of names for equal weights.
   seed: data seed.
   split: which split examples are drawn from ("train", "val" or "test").
   domains: the order that defines domain ids. Default: task names sorted, so the ids do
    not depend on how the mapping was written (ml_collections' ConfigDict sorts keys,
    a plain dict does not). Must contain every task of `tasks`; may contain more.
   registry: name -> Task objects to use instead of the defaults in `TASKS` (e.g. a
    kv_lookup with another map size).
  """

  def __init__(
    self,
    tasks: Mapping[str, float] | Sequence[str],
    seed: int = 0,
    split: str = "train",
    domains: Sequence[str] | None = None,
    registry: Mapping[str, Task] | None = None,
  ):
    from calm_jax.tasks import get_task

    if isinstance(tasks, str):
      raise TypeError("tasks must be a mapping name -> weight or a sequence of names, not a string")
    weights = dict(tasks) if isinstance(tasks, Mapping) else {name: 1.0 for name in tasks}
    if not weights:
      raise ValueError("Mixture needs at least one task")
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    self.domains = tuple(sorted(weights)) if domains is None else tuple(domains)
    if len(set(self.domains)) != len(self.domains):
      raise ValueError(f"duplicate names in domains {self.domains}")
    missing = [t for t in weights if t not in self.domains]
    if missing:
      raise ValueError(f"tasks {missing} are not in domains {self.domains}")
    registry = dict(registry or {})
    self.tasks = {name: registry[name] if name in registry else get_task(name) for name in self.domains}
    w = np.array([float(weights.get(name, 0.0)) for name in self.domains], dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"weights must be finite, >= 0 and not all 0; got {dict(zip(self.domains, w))}")
    self.weights = w / w.sum()
    self._cdf = np.cumsum(self.weights)
    self._cdf[-1] = 1.0
    self.seed, self.split = seed, split

  def domain_id(self, task_name: str) -> int:
    try:
      return self.domains.index(task_name)
    except ValueError:
      raise KeyError(f"task {task_name!r} is not in this mixture's domains {self.domains}") from None

  def example(self, index: int) -> Example:
    """Example number `index` of the stream (deterministic in seed and index)."""
    rng = np.random.default_rng([self.seed, index])
    d = int(np.searchsorted(self._cdf, rng.random(), side="right"))
    d = min(d, len(self.domains) - 1)
    while self.weights[d] == 0.0 and d > 0:  # float edge: trailing zero weights under cdf[-1]=1
      d -= 1
    ex = self.tasks[self.domains[d]].sample_split(rng, self.split)
    return dataclasses.replace(ex, domain_id=d)

  def examples(self, start: int, n: int) -> list[Example]:
    return [self.example(i) for i in range(start, start + n)]

  def __iter__(self) -> Iterator[Example]:
    i = 0
    while True:
      yield self.example(i)
      i += 1

  def batch(self, step: int, batch_size: int, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Encoded batch number `step` (examples `[step*batch_size, (step+1)*batch_size)`)."""
    return encode_batch(self.examples(step * batch_size, batch_size), tokenizer, seq_len)

  def __repr__(self) -> str:
    w = {d: round(float(x), 4) for d, x in zip(self.domains, self.weights)}
    return f"Mixture({w}, seed={self.seed}, split={self.split!r})"


def encode_batch(examples: Sequence[Example], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """Tokenize examples into right-padded arrays for next-token training.

  Each row is `[bos] + prompt + answer + [eos]` (no bos if the tokenizer has none),
  padded with `pad_id` to `seq_len`. Returns:

   tokens, inputs   int32 [B, T]  the row (two equal arrays: `inputs` names the model input)
   targets          int32 [B, T]  tokens shifted left by one: targets[:, t] = tokens[:, t+1]
                  (last column: pad)
   loss_mask        float32 [B, T] 1 where targets[:, t] is an answer token or the final eos
   attention_mask   int32 [B, T]  1 on real tokens, 0 on padding
   prompt_len       int32 [B]     number of bos + prompt tokens (the generation prefix)
   length           int32 [B]     number of real tokens
   domain           int32 [B]     Example.domain_id (-1 when unset)

  Raises ValueError naming the example if a row does not fit in `seq_len`.
  """
  if not examples:
    raise ValueError("encode_batch got no examples")
  T = int(seq_len)
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  rows = []
  for b, ex in enumerate(examples):
    prompt = bos + tokenizer.encode(ex.prompt)
    answer = tokenizer.encode(ex.answer) + [tokenizer.eos_id]
    if not prompt:
      raise ValueError(f"example {b} ({ex.task}): empty prompt and no bos token, nothing predicts the answer")
    if len(prompt) + len(answer) > T:
      raise ValueError(
        f"example {b} ({ex.task}: {ex.prompt!r} -> {ex.answer!r}) needs {len(prompt) + len(answer)} tokens "
        f"but seq_len is {T}"
      )
    rows.append((prompt + answer, [0] * len(prompt) + [1] * len(answer), len(prompt)))
  return pack_batch(rows, T, tokenizer.pad_id, [ex.domain_id for ex in examples])


def mixture_batches(tasks: Mapping[str, float], *, batch_size: int, tokenizer, seed: int = 0,
                    registry: Mapping[str, Task] | None = None, seq_len: int = 0):
  """`(mixture, seq_len, batch_fn)`: batch `step` of a `Mixture` of `tasks`, encoded to `seq_len`
  (0: the longest example the tasks can produce), as the trainer's pure `batch_fn(step)`."""
  from calm_jax.tasks import max_seq_len

  mixture = Mixture(dict(tasks), seed=seed, registry=registry)
  seq_len = int(seq_len) or max_seq_len(list(mixture.tasks.values()))
  return mixture, seq_len, lambda step: mixture.batch(step, int(batch_size), tokenizer, seq_len)
