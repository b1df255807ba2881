"""The synthetic tasks: arithmetic, key-value recall, string transforms, counting.

Prompts are short (<= 24 characters) and answers shorter (<= 8), so models trained on them
are tiny and run on a laptop CPU. Each prompt is `tag:` + operands + `=`; the answer
follows the `=`.

| name           | prompt example      | answer  |
| -------------- | ------------------- | ------- |
| addition       | `add:123+45=`       | `168`   |
| subtraction    | `sub:123-45=`       | `78`    |
| kv_lookup      | `kv:qzf=`           | `417`   |
| reverse        | `rev:abcd=`         | `dcba`  |
| sort           | `sort:dbca=`        | `abcd`  |
| copy           | `copy:abc=`         | `abc`   |
| count          | `cnt:a|abca=`       | `2`     |
| max            | `max:12,7,85=`      | `85`    |
| uppercase      | `up:abc=`           | `ABC`   |

`kv_lookup` queries a fixed key->value map built from `map_seed`; the map is never in the
prompt, so a model must memorise it. (CALM's key-value arithmetic has its own tasks and key
table: `calm/kv_tasks.py`.)
"""

from __future__ import annotations

import string

import numpy as np

from calm_jax.tasks.base import Task

__all__ = [
  "Addition",
  "Subtraction",
  "KVMap",
  "KVLookup",
  "Reverse",
  "Sort",
  "Copy",
  "Count",
  "Max",
  "Uppercase",
]

LOWER = string.ascii_lowercase


def _number(rng: np.random.Generator, max_digits: int) -> int:
  """A number whose digit count is uniform in [1, max_digits] (so short ones are not rare)."""
  d = int(rng.integers(1, max_digits + 1))
  lo = 0 if d == 1 else 10 ** (d - 1)
  return int(rng.integers(lo, 10**d))


def _letters(rng: np.random.Generator, min_len: int, max_len: int, alphabet: str = LOWER) -> str:
  n = int(rng.integers(min_len, max_len + 1))
  return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))


def _check_range(name: str, lo: int, hi: int, min_lo: int = 1) -> None:
  if not min_lo <= lo <= hi:
    raise ValueError(f"{name}: need {min_lo} <= min <= max, got min={lo}, max={hi}")


class Addition(Task):
  """`add:a+b=` -> a+b, operands with 1..max_digits digits."""

  name = "addition"

  def __init__(self, max_digits: int = 3):
    _check_range("addition", 1, max_digits)
    self.max_digits = max_digits
    self.max_prompt_chars = len("add:+=") + 2 * max_digits
    self.max_answer_chars = max_digits + 1

  def generate(self, rng):
    a, b = _number(rng, self.max_digits), _number(rng, self.max_digits)
    return f"add:{a}+{b}=", str(a + b)


class Subtraction(Task):
  """`sub:a-b=` -> a-b with a >= b (non-negative result)."""

  name = "subtraction"

  def __init__(self, max_digits: int = 3):
    _check_range("subtraction", 1, max_digits)
    self.max_digits = max_digits
    self.max_prompt_chars = len("sub:-=") + 2 * max_digits
    self.max_answer_chars = max_digits

  def generate(self, rng):
    a, b = _number(rng, self.max_digits), _number(rng, self.max_digits)
    a, b = max(a, b), min(a, b)
    return f"sub:{a}-{b}=", str(a - b)


class KVMap:
  """A fixed map of `n_keys` distinct lowercase keys of length `key_len` to integers in
  [0, max_value], a pure function of `seed` (sorted keys, so iteration order is stable)."""

  def __init__(self, n_keys: int = 64, key_len: int = 3, max_value: int = 999, seed: int = 0):
    if n_keys < 1 or key_len < 1 or max_value < 0:
      raise ValueError(f"KVMap: need n_keys >= 1, key_len >= 1, max_value >= 0; got {n_keys}, {key_len}, {max_value}")
    if n_keys > len(LOWER) ** key_len:
      raise ValueError(f"KVMap: {n_keys} keys do not fit in {len(LOWER)}**{key_len} strings")
    rng = np.random.default_rng([seed, 0x6B76])
    keys: set[str] = set()
    while len(keys) < n_keys:
      keys.add(_letters(rng, key_len, key_len))
    self.keys = tuple(sorted(keys))
    values = rng.integers(0, max_value + 1, size=n_keys)
    self.mapping = {k: int(v) for k, v in zip(self.keys, values)}
    self.n_keys, self.key_len, self.max_value, self.seed = n_keys, key_len, max_value, seed

  def __getitem__(self, key: str) -> int:
    return self.mapping[key]

  def __len__(self) -> int:
    return self.n_keys


class KVLookup(Task):
  """`kv:key=` -> value of `key` in a fixed, seeded map that is not in the prompt.

  A memorization task: train/val/test all query the same `n_keys` keys.
  """

  name = "kv_lookup"
  memorization = True

  def __init__(self, n_keys: int = 64, key_len: int = 3, max_value: int = 999, map_seed: int = 0):
    self.n_keys, self.key_len, self.max_value, self.map_seed = n_keys, key_len, max_value, map_seed
    self.kv = KVMap(n_keys, key_len, max_value, map_seed)
    self.num_prompts = n_keys
    self.max_prompt_chars = len("kv:=") + key_len
    self.max_answer_chars = len(str(max_value))

  def generate(self, rng):
    key = self.kv.keys[int(rng.integers(0, self.n_keys))]
    return f"kv:{key}=", str(self.kv[key])


class _StringTask(Task):
  """Base for tasks on a random lowercase string of length in [min_len, max_len]."""

  tag = ""

  def __init__(self, min_len: int = 3, max_len: int = 7):
    _check_range(self.name, min_len, max_len)
    self.min_len, self.max_len = min_len, max_len
    self.max_prompt_chars = len(self.tag) + 2 + max_len
    self.max_answer_chars = max_len

  def transform(self, s: str) -> str:
    raise NotImplementedError

  def generate(self, rng):
    s = _letters(rng, self.min_len, self.max_len)
    return f"{self.tag}:{s}=", self.transform(s)


class Reverse(_StringTask):
  """`rev:abcd=` -> `dcba`."""

  name, tag = "reverse", "rev"

  def transform(self, s):
    return s[::-1]


class Sort(_StringTask):
  """`sort:dbca=` -> `abcd` (letters sorted, duplicates kept)."""

  name, tag = "sort", "sort"

  def transform(self, s):
    return "".join(sorted(s))


class Copy(_StringTask):
  """`copy:abc=` -> `abc` (repeat the string back)."""

  name, tag = "copy", "copy"

  def __init__(self, min_len: int = 3, max_len: int = 8):
    super().__init__(min_len, max_len)

  def transform(self, s):
    return s


class Uppercase(_StringTask):
  """`up:abc=` -> `ABC`."""

  name, tag = "uppercase", "up"

  def transform(self, s):
    return s.upper()


class Count(Task):
  """`cnt:c|s=` -> number of occurrences of letter c in s (s over a small alphabet, so
  counts vary; the letter may be absent: answer 0)."""

  name = "count"

  def __init__(self, min_len: int = 4, max_len: int = 10, alphabet: str = "abcd"):
    _check_range("count", min_len, max_len)
    if not alphabet or not set(alphabet) <= set(LOWER) or len(set(alphabet)) != len(alphabet):
      raise ValueError(f"count: alphabet must be distinct lowercase letters, got {alphabet!r}")
    self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet
    self.max_prompt_chars = len("cnt:|=") + 1 + max_len
    self.max_answer_chars = len(str(max_len))

  def generate(self, rng):
    s = _letters(rng, self.min_len, self.max_len, self.alphabet)
    c = self.alphabet[int(rng.integers(0, len(self.alphabet)))]
    return f"cnt:{c}|{s}=", str(s.count(c))


class Max(Task):
  """`max:12,7,85=` -> `85`: the largest of min_count..max_count numbers in [0, max_value]."""

  name = "max"

  def __init__(self, min_count: int = 3, max_count: int = 5, max_value: int = 99):
    _check_range("max", min_count, max_count)
    if max_value < 0:
      raise ValueError(f"max: max_value must be >= 0, got {max_value}")
    self.min_count, self.max_count, self.max_value = min_count, max_count, max_value
    w = len(str(max_value))
    self.max_prompt_chars = len("max:=") + max_count * w + (max_count - 1)
    self.max_answer_chars = w

  def generate(self, rng):
    n = int(rng.integers(self.min_count, self.max_count + 1))
    xs = [int(x) for x in rng.integers(0, self.max_value + 1, size=n)]
    return "max:" + ",".join(map(str, xs)) + "=", str(max(xs))
