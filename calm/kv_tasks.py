"""The key-value data of CALM's Table 1 (paper §4.1), over a seeded key table.

Every key is one vocabulary token (the paper samples its keys from PaLM2's vocabulary; printed
`{qzf}`), and an operand is a fixed-width field: a head token then one digit slot per digit of N.
A number's head is `#` and its slots are its zero-padded digits; a key's head is the key's token
and its slots are blank (`_`). The anchor reads an operand's digits at its slots, and at every
slot a causal m_A has already seen the whole key, so the value can be supplied exactly where the
anchor reads it. (Keys spelled as letters, where the anchor reads digits at positions m_A has seen
only part of the key, stayed at the floor: docs/calm.md.)

| task                | prompt                | answer  | who trains on it                        |
| ------------------- | --------------------- | ------- | --------------------------------------- |
| kv_substitution     | `{qzf}___+{abc}___>`  | `17+42` | m_A (all keys); CALM (held-in keys)     |
| numeric_arithmetic  | `#017+#042=`          | `59`    | m_B (never sees a key)                  |
| kv_arithmetic       | `{qzf}___+{abc}___=`  | `59`    | CALM (held-in keys); scored on held-out |

m_A is also trained to write each key's value into the key's own blank slots
(`KeyValueTable.slot_targets`), so its state at a slot is the digit the anchor reads there.
KV-arithmetic and numeric arithmetic share their format, so the anchor's arithmetic applies
once the composition supplies the values; substitution ends in `>` so the two key tasks can
share a training mixture. A KV-arithmetic prompt and its substitution differ only in the last
character, so m_A's states over the keys are the ones it was trained on (it is causal).
"""
from __future__ import annotations

import string

import numpy as np

from calm_jax.tasks.base import Task
from calm_jax.tokenizers import DEFAULT_CHARS, CharTokenizer

LOWER = string.ascii_lowercase
KEY_SETS = ("all", "held_in", "held_out")
# Single-token keys are characters of Unicode's private use area, so the tasks stay strings and
# the tokenizer a `CharTokenizer` with these characters appended.
_KEY_BASE, _MAX_KEYS = 0xE000, 0x1000
BLANK = "_"  # a key's digit slots


class KeyValueTable:
  """`n_keys` distinct lowercase keys of `key_len` letters -> distinct values (a seeded
  permutation of 1..n_keys), and a seeded held-in subset (`held_in_fraction` of the keys).
  Keys and numbers are written as fields (module docstring)."""

  def __init__(self, n_keys: int = 100, key_len: int = 3, held_in_fraction: float = 0.2, seed: int = 0):
    if n_keys < 2 or key_len < 1 or n_keys > len(LOWER) ** key_len:
      raise ValueError(f"KeyValueTable: need 2 <= n_keys <= 26**key_len, got n_keys={n_keys}, key_len={key_len}")
    if not 0 < held_in_fraction < 1:
      raise ValueError(f"KeyValueTable: held_in_fraction must be in (0, 1), got {held_in_fraction}")
    if n_keys > _MAX_KEYS:
      raise ValueError(f"KeyValueTable: at most {_MAX_KEYS} keys (one token each), got {n_keys}")
    rng = np.random.default_rng([seed, 0x4B56])
    keys: set[str] = set()
    while len(keys) < n_keys:
      keys.add("".join(LOWER[i] for i in rng.integers(0, 26, key_len)))
    self.keys = tuple(sorted(keys))
    self.values = {k: int(v) for k, v in zip(self.keys, rng.permutation(n_keys) + 1)}
    n_in = max(1, int(round(held_in_fraction * n_keys)))
    held = set(rng.permutation(n_keys)[:n_in].tolist())
    self.held_in = tuple(k for i, k in enumerate(self.keys) if i in held)
    self.held_out = tuple(k for i, k in enumerate(self.keys) if i not in held)
    self.n_keys, self.key_len, self.seed = n_keys, key_len, seed
    self._key_index = {k: i for i, k in enumerate(self.keys)}

  @property
  def width(self) -> int:
    """Digits of the largest value (the digit slots of an operand)."""
    return len(str(self.n_keys))

  def key_text(self, key: str) -> str:
    """How `key` is written in a prompt: its token and blank digit slots."""
    return chr(_KEY_BASE + self._key_index[key]) + BLANK * self.width

  def number_text(self, value: int) -> str:
    """How an operand is written in a prompt: `#` and its zero-padded digit slots (a value outside the
    table's range, plain digits)."""
    if 0 <= value < 10 ** self.width:
      return "#" + str(value).zfill(self.width)
    return str(value)

  def tokenizer(self) -> CharTokenizer:
    """The tokenizer both models share: the character vocabulary, plus one token per key."""
    return CharTokenizer(DEFAULT_CHARS + tuple(chr(_KEY_BASE + i) for i in range(self.n_keys)))

  def pretty(self, text: str) -> str:
    """`text` with key tokens shown as `{qzf}`."""
    return "".join("{" + self.keys[ord(c) - _KEY_BASE] + "}" if _KEY_BASE <= ord(c) < _KEY_BASE + self.n_keys
                   else c for c in text)

  def slot_targets(self, tokenizer, inputs, numbers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Where the blank slots after each key token ask for that key's value: token ids
    [B, T] -> (targets [B, T], mask [B, T]) with, at the k-th slot after a key, the key's k-th
    value digit (zero-padded) and mask 1; elsewhere -1 and 0. `numbers`: a number's slots too,
    whose digit is the one written there (a number stands for itself).

    Added to m_A's loss, this trains it to write each key's value into the key's own slots, the
    positions where the anchor reads an operand's digits, so the value is what m_A's states say
    there (its unembedding reads it linearly) instead of a lookup m_A only resolves after `>`."""
    inputs = np.asarray(inputs)
    key_of = np.full(max(int(inputs.max()) + 1, tokenizer.vocab_size), -1, np.int64)
    for i in range(self.n_keys):
      key_of[tokenizer.encode(chr(_KEY_BASE + i))[0]] = i
    digit_ids = np.asarray([tokenizer.encode(str(self.values[k]).zfill(self.width)) for k in self.keys])
    blank, hash_id = tokenizer.encode(BLANK)[0], tokenizer.encode("#")[0]
    digits = np.asarray(tokenizer.encode("0123456789"))
    key_at = key_of[inputs]
    targets, mask = np.full(inputs.shape, -1, np.int64), np.zeros(inputs.shape, np.float32)
    for k in range(1, self.width + 1):
      src = np.full(inputs.shape, -1, np.int64)
      src[:, k:] = key_at[:, :-k]
      hit = (src >= 0) & (inputs == blank)
      targets[hit] = digit_ids[src[hit], k - 1]
      mask[hit] = 1.0
      if numbers:
        head = np.zeros(inputs.shape, bool)
        head[:, k:] = inputs[:, :-k] == hash_id
        run = head & np.isin(inputs, digits)
        for j in range(1, k):  # every slot between the head and this one holds a digit
          run[:, k:] &= np.isin(inputs[:, k - j:inputs.shape[1] - j], digits)
        targets[run] = inputs[run]
        mask[run] = 1.0
    return targets, mask

  def key_token_ids(self, tokenizer) -> list[int]:
    """The vocabulary ids of the key tokens."""
    return [tokenizer.encode(chr(_KEY_BASE + i))[0] for i in range(self.n_keys)]

  def numeric_twin(self, tokenizer, inputs) -> np.ndarray:
    """Token ids [B, T] with every key written as its number: a key's token becomes `#`
    and its blank slots its zero-padded value digits. Position for position, the prompt the anchor
    can already answer (`{qzf}___+{abc}___=` -> `#017+#042=`); number-only rows are unchanged."""
    inputs = np.asarray(inputs)
    targets, mask = self.slot_targets(tokenizer, inputs)
    twin = np.where(mask > 0, targets, inputs)
    return np.where(np.isin(inputs, self.key_token_ids(tokenizer)), tokenizer.encode("#")[0], twin).astype(inputs.dtype)

  def subset(self, which: str) -> tuple[str, ...]:
    if which not in KEY_SETS:
      raise ValueError(f"unknown key set {which!r}; expected one of {KEY_SETS}")
    return {"all": self.keys, "held_in": self.held_in, "held_out": self.held_out}[which]


def _evaluate(values, ops) -> int:
  """Standard precedence: * binds first, then + and - left to right."""
  terms, signs = [values[0]], [1]
  for v, o in zip(values[1:], ops):
    if o == "*":
      terms[-1] *= v
    else:
      terms.append(v)
      signs.append(1 if o == "+" else -1)
  return sum(s * t for s, t in zip(signs, terms))


class _Expression(Task):
  """An expression of `operands` terms joined by operators drawn from `ops`."""

  def __init__(self, table: KeyValueTable, operands: int = 2, ops: str = "+", keys: str = "all"):
    if operands < 2:
      raise ValueError(f"{self.name}: operands must be >= 2, got {operands}")
    if not ops or set(ops) - set("+-*"):
      raise ValueError(f"{self.name}: ops must be drawn from '+-*', got {ops!r}")
    self.table, self.operands, self.ops, self.keys = table, operands, ops, keys
    self.pool = table.subset(keys)
    # A strict key subset is a finite set of expressions used whole (its splits coincide);
    # over all keys the hash splits hold out expressions.
    self.memorization = keys != "all"
    if self.memorization:
      self.num_prompts = len(self.pool) ** operands * len(ops) ** (operands - 1)
    self.max_prompt_chars = operands * (1 + table.width) + operands
    top = table.n_keys ** operands if "*" in ops else operands * table.n_keys
    self.max_answer_chars = max(len(str(top)) + 1, operands * len(str(table.n_keys)) + operands - 1)

  def draw(self, rng):
    names = [self.pool[int(i)] for i in rng.integers(0, len(self.pool), self.operands)]
    ops = [self.ops[int(i)] for i in rng.integers(0, len(self.ops), self.operands - 1)]
    return names, ops

  @staticmethod
  def join(terms, ops) -> str:
    return "".join(str(t) + o for t, o in zip(terms, list(ops) + [""]))


class KVSubstitution(_Expression):
  """`qzf+abc>` -> `17+42`: substitute each key's value (what m_A learns)."""
  name = "kv_substitution"

  def generate(self, rng):
    names, ops = self.draw(rng)
    keys = [self.table.key_text(k) for k in names]
    return self.join(keys, ops) + ">", self.join([self.table.values[k] for k in names], ops)


class KVArithmetic(_Expression):
  """`qzf+abc=` -> value(qzf) + value(abc) (the composition task)."""
  name = "kv_arithmetic"

  def generate(self, rng):
    names, ops = self.draw(rng)
    keys = [self.table.key_text(k) for k in names]
    return self.join(keys, ops) + "=", str(_evaluate([self.table.values[k] for k in names], ops))


class NumericArithmetic(_Expression):
  """`17+42=` -> `59`, operands uniform over the table's value range 1..n_keys (what m_B learns)."""
  name = "numeric_arithmetic"

  def __init__(self, table: KeyValueTable, operands: int = 2, ops: str = "+"):
    super().__init__(table, operands, ops, keys="all")

  def generate(self, rng):
    _, ops = self.draw(rng)
    values = [int(v) for v in rng.integers(1, self.table.n_keys + 1, self.operands)]
    return self.join([self.table.number_text(v) for v in values], ops) + "=", str(_evaluate(values, ops))


def kv_registry(table: KeyValueTable, operands: int = 2, ops: str = "+") -> dict[str, dict[str, Task]]:
  """{key set: {task name: task}} for the three tasks (numeric arithmetic has no keys: same in all)."""
  return {ks: {"kv_substitution": KVSubstitution(table, operands, ops, ks),
               "kv_arithmetic": KVArithmetic(table, operands, ops, ks),
               "numeric_arithmetic": NumericArithmetic(table, operands, ops)} for ks in KEY_SETS}
