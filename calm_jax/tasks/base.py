"""Task base class, examples, and hash-based train/val/test splits.

A task turns an RNG into an `Example(prompt, answer, task)`. Which split an example
belongs to is a pure function of its prompt (a keyed hash), never of the seed or of the
order examples were drawn in. So a test example can never turn up in any training
stream, whatever seeds or sample sizes an experiment uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib

import numpy as np

__all__ = ["Example", "Task", "Interleaved", "SPLITS", "SPLIT_FRACTIONS", "split_of"]

SPLITS = ("train", "val", "test")
# Fractions of the prompt space assigned to each split (by hash of the prompt).
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
_SPLIT_BOUNDS = np.cumsum([SPLIT_FRACTIONS[s] for s in SPLITS])


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt/answer pair. `domain_id` is the task's index in a `Mixture` (-1: unset)."""

  prompt: str
  answer: str
  task: str
  domain_id: int = -1


def split_of(task_name: str, prompt: str) -> str:
  """The split ("train"/"val"/"test") a prompt of `task_name` belongs to, by stable hash."""
  digest = hashlib.blake2b(f"{task_name}\x00{prompt}".encode(), digest_size=8).digest()
  u = int.from_bytes(digest, "little") / 2.0**64
  return SPLITS[min(int(np.searchsorted(_SPLIT_BOUNDS, u, side="right")), len(SPLITS) - 1)]


def _check_split(name: str) -> None:
  if name not in SPLITS:
    raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")


class Task:
  """A synthetic task: a name, a prompt tag, a generator and an exact-match verifier.

  Subclasses set `name`, `max_prompt_chars`, `max_answer_chars` and implement
  `generate(rng) -> (prompt, answer)`. Prompts start with a tag ("add:", "rev:", ...) so a
  model can tell tasks apart, and end with "=" after which the answer follows.

  `memorization = True` marks a task whose whole point is recalling a fixed finite set
  (kv_lookup): all splits draw from the same prompts, since held-out keys could not be
  answered at all. Every other task has disjoint splits.
  """

  name: str = ""
  memorization: bool = False
  max_prompt_chars: int = 0
  max_answer_chars: int = 0
  num_prompts: int | None = None  # size of the prompt space where it is small and known

  def generate(self, rng: np.random.Generator) -> tuple[str, str]:
    raise NotImplementedError

  def sample(self, rng: np.random.Generator) -> Example:
    """One random example (any split)."""
    prompt, answer = self.generate(rng)
    return Example(prompt, answer, self.name)

  def verify(self, prediction: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()

  def split_of(self, prompt: str) -> str:
    """The split this prompt belongs to (meaningless for memorization tasks)."""
    return split_of(self.name, prompt)

  def in_split(self, prompt: str, split: str) -> bool:
    return self.memorization or self.split_of(prompt) == split

  def sample_split(self, rng: np.random.Generator, split: str, max_tries: int = 10_000) -> Example:
    """One random example of `split` (rejection sampling on the prompt hash)."""
    _check_split(split)
    for _ in range(max_tries):
      ex = self.sample(rng)
      if self.in_split(ex.prompt, split):
        return ex
    raise RuntimeError(f"task {self.name!r}: no {split!r} example in {max_tries} draws")

  def split(self, name: str, n: int, seed: int = 0, unique: bool = True) -> list[Example]:
    """`n` examples of split `name` ("train"/"val"/"test"), deterministic in `seed`.

    With `unique` (default) no prompt repeats; asking for more distinct examples than
    the split holds raises ValueError instead of looping forever.
    """
    _check_split(name)
    if n < 0:
      raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, zlib.crc32(self.name.encode()), SPLITS.index(name)])
    out: list[Example] = []
    seen: set[str] = set()
    max_draws = 200 * n + 10_000
    draws = 0
    while len(out) < n:
      if draws >= max_draws:
        raise ValueError(
          f"task {self.name!r}: found only {len(out)} distinct {name!r} examples in {draws} "
          f"draws, {n} requested; the split is too small (ask for fewer or unique=False)"
        )
      draws += 1
      ex = self.sample(rng)
      if not self.in_split(ex.prompt, name) or (unique and ex.prompt in seen):
        continue
      seen.add(ex.prompt)
      out.append(ex)
    return out

  def __repr__(self) -> str:
    fields = ", ".join(
      f"{k}={v!r}" for k, v in vars(self).items()
      if not k.startswith(("_", "max_prompt", "max_answer", "num_prompts")) and isinstance(v, (int, float, str))
    )
    return f"{type(self).__name__}({fields})"


class Interleaved(Task):
  """One task whose prompts are drawn uniformly from several tasks (e.g. a held-out "mixed"
  task for Transformer²'s first pass: known skills, an unseen task).

  A prompt keeps its own task's split and tag (the part before its first `:`), so
  the mixed test set holds no prompt its parts put in a training split. Parts must have
  distinct tags: the tag is how a prompt finds its part.
  """

  def __init__(self, name: str, parts: list[Task], probe_seed: int = 0):
    if not parts:
      raise ValueError(f"interleaved task {name!r} needs at least one part")
    self.name = name
    self.parts = list(parts)
    self._by_tag: dict[str, Task] = {}
    rng = np.random.default_rng(probe_seed)
    for part in self.parts:
      tag = self._tag(part.generate(rng)[0])
      if tag in self._by_tag:
        raise ValueError(f"interleaved task {name!r}: parts {self._by_tag[tag].name!r} and {part.name!r} "
                         f"share the prompt tag {tag!r}, so a prompt could not be traced to its part")
      self._by_tag[tag] = part
    self.memorization = any(p.memorization for p in self.parts)
    self.max_prompt_chars = max(p.max_prompt_chars for p in self.parts)
    self.max_answer_chars = max(p.max_answer_chars for p in self.parts)

  @staticmethod
  def _tag(prompt: str) -> str:
    return prompt.split(":", 1)[0]

  def part_of(self, prompt: str) -> Task:
    try:
      return self._by_tag[self._tag(prompt)]
    except KeyError:
      raise ValueError(f"interleaved task {self.name!r}: no part has the tag of {prompt!r}") from None

  def generate(self, rng):
    return self.parts[int(rng.integers(0, len(self.parts)))].generate(rng)

  def split(self, name: str, n: int, seed: int = 0, unique: bool = True) -> list[Example]:
    """`n` examples in equal shares (±1) from the parts' own `split(name, ., seed)`, shuffled: rejecting
    repeats would otherwise favour the parts with larger prompt spaces."""
    _check_split(name)
    k = len(self.parts)
    out = [Example(ex.prompt, ex.answer, self.name)
           for i, part in enumerate(self.parts)
           for ex in part.split(name, n // k + (i < n % k), seed=seed, unique=unique)]
    order = np.random.default_rng([seed, zlib.crc32(self.name.encode()), SPLITS.index(name)]).permutation(len(out))
    return [out[i] for i in order]

  def split_of(self, prompt: str) -> str:
    return self.part_of(prompt).split_of(prompt)

  def in_split(self, prompt: str, split: str) -> bool:
    return self.part_of(prompt).in_split(prompt, split)
