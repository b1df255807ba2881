"""Character spans for CALM across tokenizers: each model tokenizes the same text with its own tokenizer,
and every token carries an end key, so that anchor token t reads augmenting token s iff s's character
span ends at or before t's (`calm.compose.cross_mask`).

The text of a prompt/answer record is its prompt, a boundary, then the anchor's continuation:

* Prompt: each model lays the prompt out as training and `calm_jax.data.encode_prompt` do (its chat
  template, or [bos] + prompt) and tokenizes it whole. A token's character end is how many characters of
  the prompt it has read (offsets of the fast tokenizer, or of the character tokenizer): BOS and the
  template's tokens before the prompt end at 0 (readable by everyone), those after it at Lp = len(prompt).
* Continuation: the anchor's tokens after the prompt (the answer in training, the generated tokens in
  decoding) are turned into text one token at a time (`Continuation`, streaming detokenization: a
  token's piece is what it adds to the decoded text; a partial UTF-8 character waits for the next token),
  and each augmenting model with another tokenizer encodes each anchor token's piece on its own
  (`segment_ids`). The boundary counts as one character, so continuation token t ends at
  Lp + 1 + (characters decoded up to t), and the augmenting tokens of its piece all get t's end key:
  they become readable exactly when anchor token t is read, which is when decoding appends them
  (an append-only cache, and training sees what decoding sees). For a character-level augmenting
  model the pieces' tokens are the characters of the text: exactly its tokenization of the whole text.

End keys order (character end, tie): tie is a token's rank among the earlier tokens of its row that end
at the same character (BOS and template tokens, empty pieces such as EOS); the last prompt token takes
the highest tie, so the anchor's last prompt token reads every augmenting prompt token. A key is
`char_end * TIES + tie` (int32). Within a row keys increase strictly, so with identical tokenizations
`aug_end[s] <= anchor_end[t]` is `s <= t`: today's causal mask, exactly.

Only the prompt is tokenized whole; how a BPE splits the prompt may depend on later prompt characters,
which is harmless (the prompt is given whole before anything is predicted). Past the prompt nothing
after anchor token t's last character reaches the anchor's logits at t.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from calm_jax.data import DataError, EncodedRecord, encode_prompt, encode_record
from calm_jax.data.encoding import template_tokenizer
from calm_jax.tokenizers import CharTokenizer

TIES = 1 << 10
MAX_CHARS = (2 ** 31 - 1) // TIES - 1
_UNBOUNDED = 1 << 30
_PREFIX_TOKENS = 6  # prompt tokens a Continuation decodes before the first new one (leading-space rules)


def pack(char_end, tie) -> np.ndarray:
  """End keys (int32) of character ends and ties; raises DataError when they do not fit."""
  char_end, tie = np.asarray(char_end, np.int64), np.asarray(tie, np.int64)
  if char_end.size and (char_end.max() > MAX_CHARS or tie.max() >= TIES):
    raise DataError(f"a row of {int(char_end.max())} characters or {int(tie.max()) + 1} tokens ending at one "
                    f"character does not fit the end keys (at most {MAX_CHARS} and {TIES - 1})")
  return (char_end * TIES + tie).astype(np.int32)


def prompt_keys(char_ends: Sequence[int]) -> np.ndarray:
  """End keys of a prompt's tokens from their (non-decreasing) character ends; the last token gets the
  highest tie."""
  ends = np.asarray(char_ends, np.int64)
  if not len(ends):
    return np.zeros((0,), np.int32)
  start = np.r_[0, np.flatnonzero(np.diff(ends)) + 1]  # first index of each run of equal ends
  tie = np.arange(len(ends)) - np.repeat(start, np.diff(np.r_[start, len(ends)]))
  if tie.max() >= TIES - 1:
    raise DataError(f"{int(tie.max()) + 1} prompt tokens end at one character; at most {TIES - 2} fit the end keys")
  tie[-1] = TIES - 1
  return pack(ends, tie)


def _text_offsets(tokenizer, text: str, source: str) -> tuple[list[int], list[int]]:
  """(ids, character end of each token) of `text` with no special tokens."""
  if isinstance(tokenizer, CharTokenizer):
    try:
      ids = tokenizer.encode(text)
    except ValueError as e:
      raise DataError(f"{source}: {e}") from None
    return ids, list(range(1, len(ids) + 1))
  hf = getattr(tokenizer, "hf", None)
  try:
    enc = hf(text, return_offsets_mapping=True, add_special_tokens=False)
  except (NotImplementedError, TypeError, AttributeError) as e:
    raise DataError(f"{source}: {tokenizer!r} gives no character offsets ({type(e).__name__}); CALM across "
                    "tokenizers needs a fast (Rust) Hugging Face tokenizer or the character tokenizer") from None
  return [int(i) for i in enc["input_ids"]], [int(e) for _, e in enc["offset_mapping"]]


def prompt_layout(record, tokenizer, chat_template="auto") -> tuple[list[int], np.ndarray]:
  """(ids, character ends) of the prompt as this tokenizer lays it out (`encode_prompt`'s ids): ends count
  the prompt characters each token has read, 0 before the prompt and len(prompt) after it."""
  source = record.source
  if record.messages is not None:
    raise DataError(f"{source}: CALM across tokenizers needs prompt/answer records (a chat record's turns have "
                    "no single text both tokenizers can share)")
  text = record.prompt
  hf = template_tokenizer(tokenizer, chat_template)
  if hf is None:
    ids, ends = _text_offsets(tokenizer, text, source)
    bos = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    ids, ends = bos + ids, [0] * len(bos) + ends
  else:
    rendered = hf.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                      add_generation_prompt=True)
    start = rendered.rfind(text)
    if start < 0 or not text:
      raise DataError(f"{source}: the chat template of {tokenizer!r} does not copy the prompt verbatim, so its "
                      "characters cannot be located; set data.chat_template to False")
    ids, raw = _text_offsets(tokenizer, rendered, source)
    ends = np.clip(np.asarray(raw) - start, 0, len(text)).tolist()
  want = encode_prompt(record, tokenizer, chat_template=chat_template, max_len=_UNBOUNDED)
  if ids != want:
    raise DataError(f"{source}: tokenizing the prompt with offsets gives other tokens than the prompt layout of "
                    f"{tokenizer!r} ({len(ids)} vs {len(want)} tokens)")
  return ids, np.maximum.accumulate(np.asarray(ends, np.int64)) if ends else np.zeros((0,), np.int64)


class Continuation:
  """The anchor's continuation as text, one token at a time: `push(id)` returns the characters that token
  adds (streaming detokenization over a window that starts at the last prompt tokens, so tokenizers that
  drop a leading space at the start of a text keep it; a piece ending in a partial UTF-8 character waits).
  Training and decoding use this same class, so they cut the text alike."""

  def __init__(self, tokenizer, prompt_ids: Sequence[int]):
    self.tokenizer = tokenizer
    self.char = isinstance(tokenizer, CharTokenizer)
    self.ids = [int(i) for i in prompt_ids][-_PREFIX_TOKENS:]
    self.prefix, self.read = 0, len(self.ids)

  def _decode(self, ids) -> str:
    return self.tokenizer.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

  def push(self, token: int) -> str:
    if self.char:
      return self.tokenizer.decode([int(token)])
    self.ids.append(int(token))
    before = self._decode(self.ids[self.prefix:self.read])
    after = self._decode(self.ids[self.prefix:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
      self.prefix, self.read = self.read, len(self.ids)
      return after[len(before):]
    return ""


def segment_ids(tokenizer, piece: str) -> list[int]:
  """An augmenting tokenizer's tokens for one anchor token's piece. Characters the character tokenizer does not
  know become its <unk> (an anchor may generate any character; records are checked strictly before)."""
  if not piece:
    return []
  if isinstance(tokenizer, CharTokenizer):
    out = []
    for c in piece:
      try:
        out += tokenizer.encode(c)
      except ValueError:
        out.append(tokenizer.unk_id)
    return out
  return [int(i) for i in tokenizer.encode(piece)]


class Segmenter:
  """Follows the anchor's continuation after a prompt of `prompt_chars` characters: `push(anchor token)` returns
  its end key and, per augmenting tokenizer (None: one that shares the anchor's tokens), the tokens its piece
  adds. The one definition of the continuation's keys and segments, for training rows and for decoding."""

  def __init__(self, anchor_tokenizer, aug_tokenizers: Sequence, prompt_chars: int, anchor_prompt_ids):
    self.cont = Continuation(anchor_tokenizer, anchor_prompt_ids)
    self.augs = list(aug_tokenizers)
    self.char_end, self.tie = int(prompt_chars) + 1, -1

  def push(self, token: int) -> tuple[int, list[list[int] | None]]:
    piece = self.cont.push(token)
    if piece:
      self.char_end, self.tie = self.char_end + len(piece), 0
    else:
      self.tie += 1
    key = int(pack([self.char_end], [self.tie])[0])
    return key, [None if t is None else segment_ids(t, piece) for t in self.augs]


@dataclasses.dataclass(frozen=True, eq=False)
class ComposedPrompt:
  """A prompt as every model of a composition reads it: the anchor's (ids, end keys), and per augmenting model
  with its own tokenizer its (ids, end keys) (None for one sharing the anchor's tokens); `chars`: len(prompt)."""
  chars: int
  anchor: tuple[list[int], np.ndarray]
  augs: tuple


@dataclasses.dataclass(frozen=True, eq=False)
class ComposedRecord:
  """One record for a composition: the anchor's row (`EncodedRecord`) with its end keys, and per augmenting
  model with its own tokenizer its row (ids, end keys, prompt length; None for one sharing the anchor's)."""
  anchor: EncodedRecord
  ends: np.ndarray
  augs: tuple


def composed_prompt(record, anchor_tokenizer, aug_tokenizers: Sequence, chat_template="auto") -> ComposedPrompt:
  """Every model's prompt layout and end keys (whole, not cut)."""
  ids, ends = prompt_layout(record, anchor_tokenizer, chat_template)
  augs = []
  for tok in aug_tokenizers:
    if tok is None:
      augs.append(None)
    else:
      q_ids, q_ends = prompt_layout(record, tok, chat_template)
      augs.append((q_ids, prompt_keys(q_ends)))
  return ComposedPrompt(len(record.prompt), (ids, prompt_keys(ends)), tuple(augs))


def extend(prompt: ComposedPrompt, anchor_tokenizer, aug_tokenizers: Sequence, continuation: Sequence[int]):
  """Whole rows of the prompt followed by the anchor's `continuation` tokens: ((anchor ids, keys), per augmenting
  model (ids, keys) or None), as teacher forcing reads them and as decoding appends them."""
  seg = Segmenter(anchor_tokenizer, aug_tokenizers, prompt.chars, prompt.anchor[0])
  cont = [seg.push(int(t)) for t in continuation]
  ids = list(prompt.anchor[0]) + [int(t) for t in continuation]
  keys = np.r_[prompt.anchor[1], np.asarray([k for k, _ in cont], np.int32)].astype(np.int32)
  augs = []
  for m, p in enumerate(prompt.augs):
    if p is None:
      augs.append(None)
      continue
    a_ids, a_keys = list(p[0]), list(p[1])
    for key, pieces in cont:
      a_ids += pieces[m]
      a_keys += [key] * len(pieces[m])
    augs.append((np.asarray(a_ids, np.int32), np.asarray(a_keys, np.int32)))
  return (np.asarray(ids, np.int32), keys), augs


def _cut(n: int, prompt_len: int, max_len: int) -> tuple[int, int]:
  """`calm_jax.data.encoding`'s rule: left-cut the prompt (keeping a token), then right-cut what still does not
  fit."""
  if n <= max_len:
    return 0, n
  start = min(n - max_len, prompt_len - 1)
  return start, start + max_len


def encode_composed(record, anchor_tokenizer, aug_tokenizers: Sequence, *, chat_template="auto",
                    max_len: int) -> ComposedRecord:
  """The rows of a prompt/answer record for the anchor and each augmenting tokenizer (None: shares the anchor's
  tokens). Each row is cut to `max_len` of its own tokens by the data encoding's rule; keys are computed on the
  whole rows first, so a cut only hides characters."""
  full = encode_record(record, anchor_tokenizer, chat_template=chat_template, max_len=_UNBOUNDED)
  prompt = composed_prompt(record, anchor_tokenizer, aug_tokenizers, chat_template)
  plen = full.prompt_len
  if list(full.ids[:plen]) != list(prompt.anchor[0]):
    raise DataError(f"{record.source}: the anchor's prompt layout is not a prefix of its training row")
  (_, keys), aug_rows = extend(prompt, anchor_tokenizer, aug_tokenizers, full.ids[plen:])
  s, e = _cut(len(full.ids), plen, int(max_len))
  mask = full.loss_mask[s:e]
  anchor = EncodedRecord(ids=full.ids[s:e], loss_mask=mask, prompt_len=plen - s, truncated=s > 0 or e < len(full.ids),
                         answer_truncated=int(mask.sum()) < int(full.loss_mask.sum()), domain=record.domain,
                         source=record.source)
  augs = []
  for p, row in zip(prompt.augs, aug_rows):
    if row is None:
      augs.append(None)
      continue
    a, b = _cut(len(row[0]), len(p[0]), int(max_len))
    augs.append((row[0][a:b], row[1][a:b], len(p[0]) - a))
  return ComposedRecord(anchor, keys[s:e], tuple(augs))


def cut_prompt(prompt: ComposedPrompt, max_len: int) -> ComposedPrompt:
  """Each model's prompt left-cut to its last `max_len` tokens (what `encode_prompt` keeps)."""
  n = int(max_len)
  cut = lambda p: None if p is None else (list(p[0])[-n:], np.asarray(p[1])[-n:])
  return ComposedPrompt(prompt.chars, cut(prompt.anchor), tuple(cut(p) for p in prompt.augs))


def pad_keys(keys: np.ndarray, length: int, *, left: bool) -> np.ndarray:
  """A row's end keys padded to `length`: left padding reads nothing (-1), right padding what the last token reads
  (so the mask of a padded batch is what the causal slot mask gives there)."""
  out = np.full((length,), -1 if left else (int(keys[-1]) if len(keys) else -1), np.int32)
  if left:
    out[length - len(keys):] = keys
  else:
    out[:len(keys)] = keys
  return out
