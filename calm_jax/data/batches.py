"""Encoded records -> the trainers' padded batches, as a pure function of (seed, step).

Epoch e is a permutation of the records drawn from `np.random.default_rng([seed, e])`; the epochs are
concatenated and batch `step` is examples `[step*B, (step+1)*B)` of that stream (so batch `step` starts
in epoch `step*B // n` and may run into the next). A resumed run, a new object with the same arguments,
therefore sees exactly the batches an uninterrupted one would, with the step as the only position to
checkpoint; every record appears once per epoch.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from calm_jax.data.encoding import EncodedRecord
from calm_jax.data.records import DataError

__all__ = ["RecordBatches", "split_records"]

T = TypeVar("T")
_SPLIT_STREAM = 0x5B1  # keeps split_records' draw apart from the epoch permutations


class RecordBatches:
  """Batch `step` of `encoded_records` as `encode_batch`'s dict (calm_jax/tasks/data.py):

   tokens, inputs  int32 [B, T]   the rows, right-padded with pad_id
   targets         int32 [B, T]   tokens shifted left by one (last column: pad)
   loss_mask       float32 [B, T] 1 at position t when targets[:, t] is a trained (answer) token
   attention_mask  int32 [B, T]   1 on real tokens
   prompt_len      int32 [B]      tokens before the first trained one
   length          int32 [B]      real tokens
   domain          int32 [B]      index of the record's domain in `domains` (-1: none)

  `domains`: the order that defines domain ids, default the records' domains sorted. Give it when
  several splits must agree on the ids. Also callable: `batches(step)` is `batches.batch(step)`.
  """

  def __init__(self, encoded_records: Sequence[EncodedRecord], batch_size: int, seq_len: int, pad_id: int,
               seed: int = 0, domains: Sequence[str] | None = None):
    self.records = list(encoded_records)
    if not self.records:
      raise DataError("no records to make batches of")
    if int(batch_size) < 1:
      raise DataError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size, self.seq_len, self.pad_id, self.seed = int(batch_size), int(seq_len), int(pad_id), int(seed)
    have = {r.domain for r in self.records if r.domain is not None}
    self.domains = tuple(sorted(have) if domains is None else domains)
    ids = {d: i for i, d in enumerate(self.domains)}
    for r in self.records:
      if r.domain is not None and r.domain not in ids:
        raise DataError(f"{r.source}: domain {r.domain!r} is not one of the domains {self.domains}")
      if len(r.ids) > self.seq_len:
        raise DataError(f"{r.source}: the record has {len(r.ids)} tokens but seq_len is {self.seq_len}; "
                        "encode with max_len <= seq_len")
    self._domain = np.array([ids.get(r.domain, -1) for r in self.records], dtype=np.int32)
    self._orders: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    """Number of records (one epoch)."""
    return len(self.records)

  def order(self, epoch: int) -> np.ndarray:
    """The permutation of record indices that epoch `epoch` visits."""
    if epoch not in self._orders:
      if len(self._orders) > 4:
        self._orders.clear()
      self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
    return self._orders[epoch]

  def indices(self, step: int) -> np.ndarray:
    """Record indices of batch `step`."""
    if int(step) < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    n = len(self.records)
    stream = int(step) * self.batch_size + np.arange(self.batch_size)
    return np.array([self.order(int(g // n))[g % n] for g in stream], dtype=np.int64)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    rows = [(self.records[i].ids, self.records[i].loss_mask, self.records[i].prompt_len) for i in idx]
    return pack_batch(rows, self.seq_len, self.pad_id, self._domain[idx])

  __call__ = batch

  def __repr__(self) -> str:
    return (f"RecordBatches({len(self.records)} records, batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"seed={self.seed}, domains={self.domains})")


def pack_batch(rows: Sequence[tuple[Sequence[int], Sequence[int], int]], seq_len: int, pad_id: int,
               domain: Sequence[int]) -> dict[str, np.ndarray]:
  """Rows of (token ids, 0/1 per token: trained on, prompt length) -> the right-padded next-token batch every
  trainer takes (`calm_jax.tasks.encode_batch` documents the keys); the loss mask moves to the positions that
  predict the trained tokens."""
  B, T = len(rows), int(seq_len)
  tokens = np.full((B, T), pad_id, dtype=np.int32)
  loss_mask = np.zeros((B, T), dtype=np.float32)
  attention_mask = np.zeros((B, T), dtype=np.int32)
  prompt_len = np.zeros((B,), dtype=np.int32)
  length = np.zeros((B,), dtype=np.int32)
  for b, (ids, trained, plen) in enumerate(rows):
    L = len(ids)
    tokens[b, :L] = ids
    attention_mask[b, :L] = 1
    loss_mask[b, : L - 1] = np.asarray(trained)[1:]  # position t predicts token t+1
    prompt_len[b], length[b] = plen, L
  targets = np.full_like(tokens, pad_id)
  targets[:, :-1] = tokens[:, 1:]
  return {"tokens": tokens, "inputs": tokens.copy(), "targets": targets, "loss_mask": loss_mask,
          "attention_mask": attention_mask, "prompt_len": prompt_len, "length": length,
          "domain": np.asarray(domain, dtype=np.int32)}


def split_records(records: Sequence[T], val_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
  """(train, val): a seeded random `val_fraction` of the records (at least one, never all) for validation.

  Deterministic in (seed, number of records); each part keeps the file's order.
  """
  n = len(records)
  if not 0.0 < float(val_fraction) < 1.0:
    raise DataError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
  if n < 2:
    raise DataError(f"cannot split {n} record(s) into train and val; give a separate val file")
  n_val = min(max(int(round(n * float(val_fraction))), 1), n - 1)
  perm = np.random.default_rng([int(seed), _SPLIT_STREAM]).permutation(n)
  val = set(perm[:n_val].tolist())
  return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]
