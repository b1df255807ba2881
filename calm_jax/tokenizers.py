"""One small tokenizer interface for the synthetic suite and for Hugging Face checkpoints.

Two implementations sit behind the same `Tokenizer` protocol:

* `CharTokenizer`: a fixed, deterministic character vocabulary (< 128 ids) for the
 embedded default (synthetic tasks + tiny decoder). It refuses characters it does not
 know instead of mapping them to `<unk>`: a silent unk would hide bugs in the task suite.
* `HFTokenizer`: a thin wrapper over `transformers.AutoTokenizer` loaded from a *local*
 directory (no hub is reachable), for the real-checkpoint path.

`load_tokenizer(dir)` picks the right one from what the directory holds, so a config only
names a directory.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence, runtime_checkable

__all__ = [
  "Tokenizer",
  "CharTokenizer",
  "HFTokenizer",
  "load_tokenizer",
  "CHAR_TOKENIZER_FILE",
  "DEFAULT_CHARS",
]

CHAR_TOKENIZER_FILE = "char_tokenizer.json"

# Special tokens first, at fixed ids; they are never produced by `encode` (a literal "<"
# in the text is the ordinary character "<").
_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_DIGITS = "0123456789"
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
# Space, newline and the punctuation the tasks use, plus spares for new tasks. Append
# only: changing the order changes every id and invalidates trained checkpoints.
_PUNCT = " \n+-*=:;,.?!|()[]{}<>_#/\\%&@^~'\"$`"

DEFAULT_CHARS: tuple[str, ...] = _SPECIALS + tuple(_DIGITS + _LOWER + _UPPER + _PUNCT)


@runtime_checkable
class Tokenizer(Protocol):
  """What the task suite, decoding and training need from a tokenizer.

  `encode` adds no special tokens (callers add bos/eos explicitly, so the boundary
  between prompt and answer is exact); `decode` drops special ids and stops at nothing.
  `bos_id` may be None (e.g. Qwen2 has no bos token).
  """

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def save(self, directory: str | os.PathLike) -> None: ...


class CharTokenizer:
  """Character-level tokenizer with a fixed vocabulary: `<pad>`=0, `<bos>`=1, `<eos>`=2,
  `<unk>`=3, then digits, lower- and uppercase letters, space and punctuation.

  Deterministic by construction (the vocabulary is a constant), so a model pretrained
  on the synthetic suite and every method built on it agree on ids without sharing files;
  `save`/`load` still write the list next to a checkpoint so it stays self-describing.
  """

  def __init__(self, chars: Sequence[str] = DEFAULT_CHARS):
    chars = tuple(chars)
    if chars[: len(_SPECIALS)] != _SPECIALS:
      raise ValueError(
        f"CharTokenizer vocabulary must start with the specials {_SPECIALS}, "
        f"got {chars[:len(_SPECIALS)]}"
      )
    regular = chars[len(_SPECIALS):]
    bad = [c for c in regular if len(c) != 1]
    if bad:
      raise ValueError(f"CharTokenizer entries after the specials must be single characters, got {bad!r}")
    if len(set(chars)) != len(chars):
      dupes = sorted({c for c in chars if chars.count(c) > 1})
      raise ValueError(f"CharTokenizer vocabulary has duplicate entries: {dupes!r}")
    self.chars = chars
    self._ids = {c: i for i, c in enumerate(regular, start=len(_SPECIALS))}
    self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
    self.special_ids = frozenset(range(len(_SPECIALS)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> list[int]:
    """Ids of the characters of `text`; raises ValueError naming any unknown character."""
    ids = self._ids
    try:
      return [ids[c] for c in text]
    except KeyError:
      unknown = next(c for c in text if c not in ids)
      raise ValueError(
        f"CharTokenizer cannot encode character {unknown!r} (U+{ord(unknown):04X}) "
        f"at position {text.index(unknown)} of {text!r}; it is not in the vocabulary"
      ) from None

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, skipping special ids (pad/bos/eos/unk); does not stop at eos."""
    out = []
    n = len(self.chars)
    for i in ids:
      i = int(i)
      if i in self.special_ids:
        continue
      if not 0 <= i < n:
        raise ValueError(f"CharTokenizer id {i} is out of range [0, {n})")
      out.append(self.chars[i])
    return "".join(out)

  def save(self, directory: str | os.PathLike) -> None:
    """Write `char_tokenizer.json` (the ordered character list) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHAR_TOKENIZER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"type": "char", "version": 1, "chars": list(self.chars)}, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)  # no partial file where a finished one would be

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "CharTokenizer":
    """Read a tokenizer written by `save`."""
    path = os.path.join(directory, CHAR_TOKENIZER_FILE)
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"no {CHAR_TOKENIZER_FILE} in {os.fspath(directory)!r}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("type") != "char" or not isinstance(data.get("chars"), list):
      raise ValueError(f"{path} is not a CharTokenizer file (expected {{'type': 'char', 'chars': [...]}})")
    return cls(data["chars"])

  def __repr__(self) -> str:
    return f"CharTokenizer(vocab_size={self.vocab_size})"

  def __eq__(self, other) -> bool:
    return isinstance(other, CharTokenizer) and other.chars == self.chars

  def __hash__(self) -> int:
    return hash(self.chars)


class HFTokenizer:
  """A Hugging Face tokenizer from a local directory, behind the `Tokenizer` interface.

  `encode` adds no special tokens; `decode` skips them. Without a pad token the eos id
  is used for padding (padding positions are masked out of the loss anyway).
  """

  def __init__(self, directory: str | os.PathLike):
    from calm_jax.hub import model_dir
    directory = os.fspath(model_dir(directory))
    import transformers  # heavy import, only on the real-checkpoint path

    self.directory = directory
    self.hf = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if self.hf.eos_token_id is None:
      raise ValueError(f"tokenizer in {directory!r} defines no eos token; generation could not stop")
    self.eos_id = int(self.hf.eos_token_id)
    self.bos_id = None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)
    self.pad_id = self.eos_id if self.hf.pad_token_id is None else int(self.hf.pad_token_id)

  @property
  def vocab_size(self) -> int:
    return len(self.hf)  # includes added tokens; the model's embedding may be larger

  def encode(self, text: str) -> list[int]:
    return list(self.hf.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, directory: str | os.PathLike) -> None:
    self.hf.save_pretrained(os.fspath(directory))

  def __repr__(self) -> str:
    return f"HFTokenizer({self.directory!r}, vocab_size={self.vocab_size})"


# the files one of which an HF tokenizer directory holds (fast tokenizer, sentencepiece model, BPE vocab)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
  """`CharTokenizer` if `directory` holds `char_tokenizer.json`, else `HFTokenizer` (`directory` may
  also be a model name `calm_jax.hub.model_dir` resolves)."""
  from calm_jax.hub import model_dir
  from calm_jax.errors import UserError
  directory = model_dir(directory)
  if os.path.isfile(os.path.join(directory, CHAR_TOKENIZER_FILE)):
    return CharTokenizer.load(directory)
  if os.path.isdir(directory) and not any(os.path.isfile(os.path.join(directory, f)) for f in HF_TOKENIZER_FILES):
    raise UserError(f"{directory} has no tokenizer (none of {', '.join((CHAR_TOKENIZER_FILE,) + HF_TOKENIZER_FILES)}); "
                    "copy the tokenizer files of the model it was made from into it")
  return HFTokenizer(directory)
