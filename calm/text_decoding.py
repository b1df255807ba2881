"""Iterative decoding of a composition whose augmenting models have their own tokenizers (calm/spans.py).

Each model's prompt is prefilled into its own cache. Then, per generated anchor token: the token's text
piece is decoded on the host (`spans.Segmenter`, the same code that lays out training rows), every
augmenting model with another tokenizer encodes the piece, and one jitted step feeds the anchor its token
and each augmenting model the piece's tokens (0 or more per row, padded to a bucketed width and masked),
appended to its cache: caches only grow, and each augmenting cache is enlarged (copied into a longer one)
when a piece would not fit. The new augmenting slots carry the anchor token's end key, so the anchor
token reads them, and no earlier one could have. Greedy; the result equals the argmax of a full
teacher-forced forward over the final tokens (tests/test_calm_tokenizers.py).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm.compose import AugStream, CalmCache, CompositionSpec, forward
from calm.spans import ComposedPrompt, Segmenter, pad_keys
from calm_jax.decoding import bucket, hf_positions


@functools.partial(jax.jit, static_argnames=("spec",))
def _prefill(spec, params, cache, tokens, valid, ends, streams):
  logits, cache = forward(spec, params, tokens, positions=hf_positions(valid), valid=valid, cache=cache,
                          streams=streams, ends=ends)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("spec",))
def _step(spec, params, cache, tokens, positions, ends, streams):
  b = tokens.shape[0]
  logits, cache = forward(spec, params, tokens[:, None], positions=positions[:, None], valid=jnp.ones((b, 1), bool),
                          cache=cache, streams=streams, ends=ends[:, None])
  return logits[:, 0], cache


def _grow(cache: CalmCache, m: int, length: int) -> CalmCache:
  """The cache with augmenting model m's slots extended to `length` (empty slots appended)."""
  aug = cache.augments[m]
  extra = length - aug.valid.shape[1]
  pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
  augs = list(cache.augments)
  augs[m] = aug._replace(k=pad(aug.k, 3), v=pad(aug.v, 3), valid=pad(aug.valid, 1))
  ck, cv, own = list(cache.cross_k), list(cache.cross_v), list(cache.own)
  ck[m], cv[m] = pad(ck[m], 2), pad(cv[m], 2)
  own[m] = (pad(own[m][0], 1), jnp.pad(own[m][1], [(0, 0), (0, extra)]))
  return cache._replace(augments=tuple(augs), cross_k=tuple(ck), cross_v=tuple(cv), own=tuple(own))


def _left_pad(rows, length: int, pad_id: int):
  """Left-padded [B, length] tokens, valid and end keys of (ids, keys) rows."""
  b = len(rows)
  tokens, valid = np.full((b, length), pad_id, np.int32), np.zeros((b, length), bool)
  ends = np.stack([pad_keys(np.asarray(k, np.int32), length, left=True) for _, k in rows])
  for i, (ids, _) in enumerate(rows):
    tokens[i, length - len(ids):], valid[i, length - len(ids):] = ids, True
  return tokens, valid, ends


def generate(spec: CompositionSpec, params, prompts: Sequence[ComposedPrompt], anchor_tokenizer,
             aug_tokenizers: Sequence, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
             aug_pad_ids: Sequence[int | None], return_logits: bool = False, batch_multiple: int = 8,
             aug_reserve: int = 4):
  """Greedy new anchor tokens per prompt (lists, each ending at its first EOS, included).

  prompts: `spans.composed_prompt` (cut with `spans.cut_prompt` as needed); aug_tokenizers[m] None for an
  augmenting model that shares the anchor's tokens. With return_logits, also the anchor's logits [n, V] per
  prompt at the positions that chose each new token. aug_reserve: augmenting slots reserved per new token
  before a cache is first enlarged."""
  n, eos = int(max_new_tokens), set(int(e) for e in eos_ids)
  if n < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not prompts:
    return ([], []) if return_logits else []
  n_aug = len(spec.augments)
  b = len(prompts)
  bb = bucket(b, batch_multiple)
  rows = [p.anchor for p in prompts] + [([pad_id], np.zeros((1,), np.int32))] * (bb - b)
  p_len = bucket(max(len(r[0]) for r in rows), 16)
  tokens, valid, ends = _left_pad(rows, p_len, pad_id)
  streams, aug_len, aug_pos = [None] * n_aug, [0] * n_aug, [None] * n_aug
  for m in range(n_aug):
    if not spec.own(m):
      continue
    a_rows = [p.augs[m] for p in prompts] + [([aug_pad_ids[m]], np.zeros((1,), np.int32))] * (bb - b)
    length = bucket(max(len(r[0]) for r in a_rows), 16)
    at, av, ae = _left_pad(a_rows, length, aug_pad_ids[m])
    streams[m] = AugStream(jnp.asarray(at), jnp.asarray(av), hf_positions(av), jnp.asarray(ae))
    aug_len[m] = length + bucket(int(aug_reserve) * n, 64)
    aug_pos[m] = av.sum(-1).astype(np.int32)
  dtype = params["anchor"]["embed"].dtype
  cache = CalmCache.empty(spec, bb, p_len + n - 1, dtype, aug_lengths=aug_len)
  logits, cache = _prefill(spec, params, cache, jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(ends),
                           tuple(streams))
  segs = [Segmenter(anchor_tokenizer, aug_tokenizers, p.chars, p.anchor[0]) for p in prompts]
  pos = valid.sum(-1).astype(np.int32)
  done = np.arange(bb) >= b
  out, kept = [[] for _ in range(b)], [[] for _ in range(b)]
  for i in range(n):
    lg = np.asarray(jax.device_get(logits))
    tok = lg.argmax(-1).astype(np.int32)
    for r in np.flatnonzero(~done):
      out[r].append(int(tok[r]))
      kept[r].append(lg[r])
      done[r] = int(tok[r]) in eos
    if done.all() or i == n - 1:
      break
    keys = np.full((bb,), -1, np.int32)
    pieces = [[[] for _ in range(bb)] for _ in range(n_aug)]
    for r in np.flatnonzero(~done):
      keys[r], per = segs[r].push(int(tok[r]))
      for m in range(n_aug):
        if spec.own(m):
          pieces[m][r] = per[m]
    tok = np.where(done, pad_id, tok).astype(np.int32)
    step_streams = [None] * n_aug
    for m in range(n_aug):
      if not spec.own(m):
        continue
      width = bucket(max(1, max(len(x) for x in pieces[m])), 64)
      ct, cv = np.full((bb, width), aug_pad_ids[m], np.int32), np.zeros((bb, width), bool)
      for r, x in enumerate(pieces[m]):
        ct[r, :len(x)], cv[r, :len(x)] = x, True
      cp = aug_pos[m][:, None] + np.arange(width)[None]
      index = int(cache.augments[m].index)
      if index + width > cache.augments[m].valid.shape[1]:
        cache = _grow(cache, m, max(2 * cache.augments[m].valid.shape[1], index + width))
      step_streams[m] = AugStream(jnp.asarray(ct), jnp.asarray(cv), jnp.asarray(cp, jnp.int32),
                                  jnp.asarray(np.repeat(keys[:, None], width, 1)))
      aug_pos[m] = aug_pos[m] + cv.sum(-1).astype(np.int32)
    logits, cache = _step(spec, params, cache, jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(keys),
                          tuple(step_streams))
    pos = pos + 1
  if return_logits:
    return out, [np.stack(k) for k in kept]
  return out
