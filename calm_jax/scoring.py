"""Log-likelihood of given continuations under our decoder, batched: what multiple-choice accuracy,
answer perplexity and lm-evaluation-harness' `loglikelihood` requests need.

`score(model, rows, targets)`: each row is token ids, `targets[i]` marks (0/1 per token) the tokens
whose log-probability given everything before them is summed. Rows are sorted by length, right-padded
to bucketed lengths and batched, so a file of many records compiles a handful of programs.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.decoding import bucket
from calm_jax.models.decoder import forward


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_logprobs(cfg, params, tokens, valid):
  """(log p(tokens[:, t+1] | tokens[:, :t+1]), whether it is the argmax) for t < T-1: [B, T-1] each."""
  logits, _ = forward(cfg, params, tokens, valid=valid)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nxt = tokens[:, 1:]
  lp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
  return lp, jnp.argmax(logp, axis=-1) == nxt


def score(model, rows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, batch_size: int = 8,
          params=None, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per row: (sum of log p over the target tokens, number of target tokens, all of them greedy).

  `targets[i][t]` = 1 scores token t of row i given tokens < t (so targets[i][0] must be 0).
  `progress(n)` is called after each batch with the number of rows done in it.
  """
  cfg = model.config
  params = model.params() if params is None else params
  n = len(rows)
  if len(targets) != n:
    raise ValueError(f"{n} rows but {len(targets)} target masks")
  total, count, greedy = np.zeros(n), np.zeros(n, np.int64), np.ones(n, bool)
  order = sorted(range(n), key=lambda i: -len(rows[i]))
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    t = bucket(max(len(rows[i]) for i in idx), 64)
    b = bucket(len(idx), batch_size)
    tokens = np.full((b, t), pad, np.int32)
    valid = np.zeros((b, t), bool)
    mask = np.zeros((b, t - 1), bool)
    for j, i in enumerate(idx):
      row, tgt = np.asarray(rows[i]), np.asarray(targets[i], bool)
      if len(tgt) != len(row):
        raise ValueError(f"row {i}: {len(row)} tokens but {len(tgt)} target flags")
      if len(row) and tgt[0]:
        raise ValueError(f"row {i}: the first token has nothing before it and cannot be scored")
      tokens[j, :len(row)], valid[j, :len(row)] = row, True
      mask[j, :len(row) - 1] = tgt[1:]
    valid[len(idx):, 0] = True  # dummy rows: one real token, nothing scored
    lp, top = jax.device_get(_token_logprobs(cfg, params, tokens, valid))
    for j, i in enumerate(idx):
      m = mask[j]
      total[i], count[i], greedy[i] = float(lp[j][m].sum()), int(m.sum()), bool(top[j][m].all())
    if progress is not None:
      progress(len(idx))
  return total, count, greedy
