"""Iterative decoding of a composition: every generated token is fed to the anchor and to every
augmenting model (paper §3.1), each with its own KV cache, and the projected m_A keys/values
are cached per connection. The sampling loop is the core's `calm_jax.decoding.decode`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm.compose import CalmCache, CompositionSpec, forward
from calm_jax.decoding import bucket, decode, default_pad_id, hf_positions


def prefill(spec: CompositionSpec, params, tokens, valid, *, cache_length: int, cache_dtype=None):
  """Left-padded prompts [B, P] through all models into fresh caches of `cache_length` slots.

  Returns (logits after the last prompt token [B, V], state for `step`)."""
  b = tokens.shape[0]
  dtype = cache_dtype or params["anchor"]["embed"].dtype
  cache = CalmCache.empty(spec, b, cache_length, dtype)
  logits, cache = forward(spec, params, tokens, positions=hf_positions(valid), valid=valid, cache=cache)
  return logits[:, -1], (cache, jnp.sum(valid, axis=-1).astype(jnp.int32))


def step(spec: CompositionSpec, params, state, tokens):
  """One token per row through the composition (the `step_fn` of `decode`). In the encoder
  ablation the augmenting models do not see generated tokens."""
  cache, pos = state
  b = tokens.shape[0]
  logits, cache = forward(spec, params, tokens[:, None], positions=pos[:, None], valid=jnp.ones((b, 1), bool),
                          cache=cache, run_augments=spec.aug_mode == "iterative")
  return logits[:, 0], (cache, pos + 1)


def generate_arrays(spec: CompositionSpec, params, tokens, valid, key, *, max_new_tokens: int, temperature=0.0,
                    top_k: int = 0, top_p=1.0, eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                    done=None):
  """Generates from a left-padded batch [B, P] (pure; jit it with spec etc. static).

  Returns (new_tokens [B, N], logprobs [B, N], lengths [B]) as `calm_jax.decoding.generate_arrays`."""
  cfg = spec.anchor
  eos_ids = tuple(cfg.eos_token_ids) if eos_ids is None else tuple(eos_ids)
  pad_id = default_pad_id(cfg, eos_ids) if pad_id is None else int(pad_id)
  tokens, valid = jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool)
  logits, state = prefill(spec, params, tokens, valid, cache_length=tokens.shape[1] + int(max_new_tokens) - 1)
  toks, lps, lengths, _ = decode(functools.partial(step, spec, params), state, logits, key,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_ids=eos_ids, pad_id=pad_id, done=done)
  return toks, lps, lengths


@functools.partial(jax.jit, static_argnames=("spec", "max_new_tokens", "eos_ids", "pad_id"))
def _greedy_jit(spec, params, tokens, valid, done, *, max_new_tokens, eos_ids, pad_id):
  return generate_arrays(spec, params, tokens, valid, jax.random.key(0), max_new_tokens=max_new_tokens,
                         eos_ids=eos_ids, pad_id=pad_id, done=done)


def generate(spec: CompositionSpec, params, prompts, max_new_tokens: int = 32, eos_token_id=None, *,
             prompt_multiple: int = 16, batch_multiple: int = 8) -> list[list[int]]:
  """Greedy new tokens per prompt (lists of ids, each ending at its first EOS, included).

  Prompts are left-padded to a bucketed length and the batch to a bucketed size, as in
  `calm_jax.decoding.generate`, so evaluation compiles a handful of programs."""
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    return []
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  cfg = spec.anchor
  eos_ids = tuple(cfg.eos_token_ids) if eos_token_id is None else (
      (int(eos_token_id),) if isinstance(eos_token_id, (int, np.integer)) else tuple(map(int, eos_token_id)))
  pad_id = default_pad_id(cfg, eos_ids)
  b = len(prompts)
  bb, p = bucket(b, batch_multiple), bucket(max(map(len, prompts)), prompt_multiple)
  tokens = np.full((bb, p), pad_id, np.int32)
  valid = np.zeros((bb, p), bool)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):], valid[i, p - len(x):] = x, True
  valid[b:, -1] = True  # dummy rows: one real token each
  toks, _, lengths = jax.device_get(_greedy_jit(spec, params, tokens, valid, np.arange(bb) >= b,
                                                max_new_tokens=int(max_new_tokens), eos_ids=eos_ids, pad_id=pad_id))
  return [toks[i, :lengths[i]].tolist() for i in range(b)]
