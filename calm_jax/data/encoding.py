"""Records -> token ids with a loss mask on the answer (or assistant) tokens only.

Without a chat template a record is `[bos] + prompt + answer + [eos]` (no bos if the tokenizer has
none), with the loss on answer + eos: `encode_batch`'s convention (calm_jax/tasks/data.py). With one
(an HF tokenizer's `chat_template`), a prompt/answer record is the conversation [user: prompt,
assistant: answer], rendered by the template; each assistant turn's tokens are what the conversation
up to and including that turn adds to the conversation before it with the generation prompt, so the
loss covers exactly the assistant's text and the template's end-of-turn marker.

Too long rows are cut to `max_len`: the prompt (everything before the first trained token) loses
tokens on the left, keeping at least one; if the rest still does not fit it is cut on the right.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Sequence

import numpy as np

from calm_jax.data.records import DataError, Message, Record

__all__ = ["EncodedRecord", "encode_record", "encode_records", "encode_prompt", "prompt_and_reference",
           "template_tokenizer"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedRecord:
  """One record as tokens.

  ids        int32 [L]   the row, L <= max_len
  loss_mask  uint8 [L]   1 on the tokens trained on (answer / assistant tokens, the end marker)
  prompt_len             tokens before the first trained one (the generation prefix)
  truncated              tokens were cut to fit max_len; answer_truncated: some trained ones were
  """

  ids: np.ndarray
  loss_mask: np.ndarray
  prompt_len: int
  truncated: bool = False
  answer_truncated: bool = False
  domain: str | None = None
  source: str = ""


def template_tokenizer(tokenizer, chat_template="auto"):
  """The HF tokenizer whose chat template to use, or None for the plain bos/prompt/answer/eos layout.

  `chat_template`: "auto" (the template when the tokenizer has one), True (require one) or False
  (never); the strings "true"/"false" (as a command-line override gives them) count as the booleans.
  """
  mode = chat_template.lower() if isinstance(chat_template, str) else chat_template
  mode = {"true": True, "false": False}.get(mode, mode)
  if mode not in ("auto", True, False):
    raise DataError(f"data.chat_template is {chat_template!r}; expected 'auto', True or False")
  hf = getattr(tokenizer, "hf", None)
  has = hf is not None and bool(getattr(hf, "chat_template", None))
  if mode is True and not has:
    raise DataError(f"data.chat_template is True but {tokenizer!r} has no chat template "
                    "(set it to 'auto' or False to train on [bos] + prompt + answer + [eos])")
  return hf if has and mode is not False else None


def encode_record(record: Record, tokenizer, *, chat_template="auto", max_len: int) -> EncodedRecord:
  """One record's tokens and loss mask, cut to `max_len` (see the module docstring)."""
  return _encode(record, tokenizer, template_tokenizer(tokenizer, chat_template), max_len)


def encode_records(records: Sequence[Record], tokenizer, *, chat_template="auto", max_len: int,
                   name: str | None = None) -> list[EncodedRecord]:
  """All records encoded; logs once how many were truncated (`name`: what to call them, default the files)."""
  hf = template_tokenizer(tokenizer, chat_template)
  out = [_encode(r, tokenizer, hf, max_len) for r in records]
  cut = sum(e.truncated for e in out)
  if cut:
    name = name or ", ".join(sorted({r.file for r in records}))
    lost = sum(e.answer_truncated for e in out)
    logger.warning("%d of %d records of %s were truncated to max_len=%d%s", cut, len(out), name, max_len,
                   f" ({lost} of them lost answer tokens)" if lost else "")
  return out


def _encode(record: Record, tokenizer, hf, max_len: int) -> EncodedRecord:
  if int(max_len) < 2:
    raise DataError(f"max_len must be >= 2 (a prompt token and an answer token), got {max_len}")
  ids, mask, prompt_len = _templated(record, tokenizer, hf) if hf is not None else _plain(record, tokenizer)
  n, start, end = len(ids), 0, len(ids)
  if n > max_len:  # left-cut the prompt, keeping one token; then right-cut what still does not fit
    start = min(n - max_len, prompt_len - 1)
    end = start + max_len
  kept = mask[start:end]
  return EncodedRecord(ids=np.asarray(ids[start:end], np.int32), loss_mask=np.asarray(kept, np.uint8),
                       prompt_len=prompt_len - start, truncated=n > max_len,
                       answer_truncated=int(sum(kept)) < int(sum(mask)), domain=record.domain,
                       source=record.source)


def _plain(record: Record, tokenizer) -> tuple[list[int], list[int], int]:
  if record.messages is not None:
    raise DataError(f"{record.source}: a chat record needs a chat template, and {tokenizer!r} has none "
                    "(or data.chat_template is False); use prompt/answer records instead")
  bos = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
  prompt = bos + _tokens(tokenizer, record.prompt, record.source, "prompt")
  answer = _tokens(tokenizer, record.answer, record.source, "answer") + [int(tokenizer.eos_id)]
  if not prompt:
    raise DataError(f"{record.source}: field 'prompt' is empty and {tokenizer!r} has no bos token, "
                    "so nothing would predict the answer's first token")
  return prompt + answer, [0] * len(prompt) + [1] * len(answer), len(prompt)


def _tokens(tokenizer, text: str, source: str, field: str) -> list[int]:
  try:
    return [int(i) for i in tokenizer.encode(text)]
  except ValueError as e:  # CharTokenizer refuses characters it does not know
    raise DataError(f"{source}: field {field!r}: {e}") from None


def _templated(record: Record, tokenizer, hf) -> tuple[list[int], list[int], int]:
  messages = record.messages or (Message("user", record.prompt), Message("assistant", record.answer))
  turns = [{"role": m.role, "content": m.content} for m in messages]
  full = _render(hf, turns, False, record.source, tokenizer)
  mask = [0] * len(full)
  prompt_len = None
  for k, m in enumerate(messages):
    if m.role != "assistant":
      continue
    before = _render(hf, turns[:k], True, record.source, tokenizer)
    upto = _render(hf, turns[: k + 1], False, record.source, tokenizer)
    if upto[: len(before)] != before or full[: len(upto)] != upto:
      raise DataError(f"{record.source}: the chat template of {tokenizer!r} is not prefix-stable (a conversation "
                      f"does not start with the tokens of its beginning), so assistant turn {k} cannot be found; "
                      "set data.chat_template to False, or use a template that only appends")
    if len(upto) == len(before):
      raise DataError(f"{record.source}: assistant turn {k} renders to no tokens with the chat template of "
                      f"{tokenizer!r}")
    if upto == _render(hf, turns[:k] + [{**turns[k], "content": ""}], False, record.source, tokenizer):
      raise DataError(f"{record.source}: the answer of assistant turn {k} is empty after templating (the chat "
                      f"template of {tokenizer!r} renders it as it renders an empty answer), so nothing of it "
                      "would be trained on or scored")
    mask[len(before): len(upto)] = [1] * (len(upto) - len(before))
    prompt_len = len(before) if prompt_len is None else prompt_len
  if prompt_len == 0:
    raise DataError(f"{record.source}: the chat template of {tokenizer!r} puts no token before the first "
                    "assistant turn, so nothing would predict its first token")
  return full, mask, prompt_len


def _render(hf, turns: list[dict], add_generation_prompt: bool, source: str, tokenizer) -> list[int]:
  """The template's token ids. transformers 5 returns a BatchEncoding unless told not to; both are handled."""
  kwargs = dict(add_generation_prompt=add_generation_prompt, tokenize=True)
  try:
    try:
      out = hf.apply_chat_template(turns, return_dict=False, **kwargs)
    except TypeError:  # a transformers without return_dict
      out = hf.apply_chat_template(turns, **kwargs)
  except Exception as e:  # jinja errors, raise_exception() in the template
    msg = str(e).strip().splitlines()[0] if str(e).strip() else "(no message)"
    raise DataError(f"{source}: the chat template of {tokenizer!r} failed: {type(e).__name__}: {msg}") from e
  if isinstance(out, Mapping):
    out = out["input_ids"]
  out = list(out)
  if out and not np.isscalar(out[0]):  # a batch of one
    out = list(out[0])
  return [int(i) for i in out]


def prompt_and_reference(record: Record) -> tuple[Record, str]:
  """What a model is asked and what it should answer, for evaluation: a prompt/answer record as it is;
  a chat record up to its last assistant turn, whose content is the reference."""
  if record.messages is None:
    return record, record.answer
  last = max(k for k, m in enumerate(record.messages) if m.role == "assistant")
  return dataclasses.replace(record, messages=record.messages[:last]), record.messages[last].content


def encode_prompt(record: Record, tokenizer, *, chat_template="auto", max_len: int) -> list[int]:
  """The token ids a model generates its answer after, as training lays them out (the template's
  generation prompt, or [bos] + prompt), left-cut to `max_len`; for chat records, the conversation
  before the last assistant turn (`prompt_and_reference`)."""
  hf = template_tokenizer(tokenizer, chat_template)
  record, _ = prompt_and_reference(record)
  if hf is None:
    if record.messages is not None:
      _plain(record, tokenizer)  # raises: a chat record needs a template
    bos = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    ids = bos + _tokens(tokenizer, record.prompt, record.source, "prompt")
  else:
    messages = record.messages if record.messages is not None else (Message("user", record.prompt),)
    ids = _render(hf, [{"role": m.role, "content": m.content} for m in messages], True, record.source, tokenizer)
  if not ids:
    raise DataError(f"{record.source}: the prompt encodes to no tokens")
  return ids[-int(max_len):]
