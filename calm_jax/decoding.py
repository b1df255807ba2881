"""Jit-compiled autoregressive generation with a KV cache.

Three layers, each usable on its own:

* `decode(step_fn, state, first_logits, key, ...)`: the generic loop. A pure function of
  pytrees: `step_fn(state, tokens[B]) -> (logits[B, V], state)` feeds one token per row and
  returns the next logits. CALM (two caches), SVF (vmapped over parameter sets) and LoRA
  methods bring their own step functions and share the sampling, EOS and bookkeeping code.
* `generate_arrays(cfg, params, tokens, valid, key, ...)`: prefill + `decode` for our
  decoder on left-padded arrays. Pure (not jitted), so it can sit under `jax.vmap` / `jax.jit`.
* `generate(model, prompts, ...)`: the list-in, list-out convenience. Left-pads to a bucketed
  prompt length and pads the batch to a bucketed size (dummy rows), so evaluating many
  batches compiles once per bucket rather than once per shape.

Conventions (documented once, used everywhere):
* Positions follow HF `generate`: `cumsum(valid) - 1` over the left-padded prompt (0 on
  padding), then one more per generated token.
* EOS is *included* as the last returned token of a row, as HF does; later slots are padding.
* Log-probs are `log_softmax` of the model's raw logits (before temperature, top-k, top-p) at
  the chosen token: the policy log-likelihood REINFORCE needs, independent of how we sampled.
* Sampling order is HF's: temperature, then top-k, then top-p (nucleus), then categorical;
  temperature 0 is greedy (argmax, first index on ties, like torch).

Layer loop of the decode steps (`layer_loop`): the prompt is prefilled by the layer scan (one
compile whatever the depth); each generated token then runs the layers either as that scan
("scan") or unrolled over per-layer weight buffers sliced once per call before the loop
("unroll"). On the XLA CPU backend the scan's per-step dynamic slice of every stacked weight is a
copy (a weight-sized write and read per layer and token: decode is memory-bound, so this was
~1/3 of a step), which "unroll" avoids at the price of a second copy of the layer weights for
the duration of the call and a compile that grows with depth. "auto" = unroll on CPU, scan
on accelerators (where weight memory is the scarce resource).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.models.config import DecoderConfig
from calm_jax.models.decoder import PLAIN, Hooks, KVCache, forward, unstack_cache, unstack_layers

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


def _is_static(x, value) -> bool:
  """True when x is a Python number equal to value (so the branch can be decided at trace time)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x == value


def sample_logits(logits, key, *, temperature=0.0, top_k: int = 0, top_p=1.0):
  """Next tokens [B] (int32) from logits [B, V].

  temperature: Python 0 -> greedy (no randomness used); else a float or traced scalar.
  top_k: static int, 0 = off. top_p: Python 1.0 = off; else a float or traced scalar.
  """
  logits = logits.astype(jnp.float32)
  if _is_static(temperature, 0):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = logits / temperature
  if top_k and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if not _is_static(top_p, 1):
    # Keep a token when the probability mass ranked strictly above it is < top_p (HF's rule:
    # drop where the ascending cumsum <= 1 - top_p); the top token always survives.
    srt = jnp.sort(x, axis=-1)[..., ::-1]
    p = jax.nn.softmax(srt, axis=-1)
    above = jnp.cumsum(p, axis=-1) - p
    keep = above < top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def token_logprobs(logits, tokens):
  """log_softmax(logits)[tokens] in fp32: logits [B, V], tokens [B] -> [B]."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]


def decode(step_fn: StepFn, state, first_logits, key, *, max_new_tokens: int, temperature=0.0,
           top_k: int = 0, top_p=1.0, eos_ids: Sequence[int] = (), pad_id: int = 0, done=None):
  """The generation loop: sample, record, feed back, until `max_new_tokens` or every row is done.

  first_logits [B, V] are the logits after the prompt (from a prefill); `state` is whatever
  `step_fn` threads (caches, positions). `done` [B] marks rows that produce nothing (e.g.
  batch padding). A row finishes after emitting one of `eos_ids` (that token is kept); a
  finished row then emits `pad_id` (logprob 0) and feeds `pad_id` to `step_fn`. The loop is a
  `lax.while_loop` that exits as soon as every row is done and never runs a step whose
  logits would go unused. The step key is `fold_in(key, i)`, so results do not depend on
  when the loop stops.
  Returns (tokens [B, N] int32, logprobs [B, N] fp32, lengths [B] int32, final state).
  """
  b = first_logits.shape[0]
  n = int(max_new_tokens)
  if n < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  eos = jnp.asarray(tuple(eos_ids), jnp.int32).reshape(-1)
  done = jnp.zeros((b,), bool) if done is None else jnp.asarray(done, bool)

  def pick(i, logits, toks, lps, lengths, done):
    tok = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature, top_k=top_k, top_p=top_p)
    lp = token_logprobs(logits, tok)
    tok = jnp.where(done, pad_id, tok).astype(jnp.int32)
    lp = jnp.where(done, 0.0, lp)
    toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
    lps = jax.lax.dynamic_update_slice(lps, lp[:, None], (0, i))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos)
    return tok, toks, lps, lengths, done

  toks = jnp.full((b, n), pad_id, jnp.int32)
  lps = jnp.zeros((b, n), jnp.float32)
  lengths = jnp.zeros((b,), jnp.int32)
  tok, toks, lps, lengths, done = pick(0, first_logits, toks, lps, lengths, done)

  def cond(c):
    i, _, _, _, _, _, done = c
    return (i < n) & ~jnp.all(done)

  def body(c):
    i, tok, state, toks, lps, lengths, done = c
    logits, state = step_fn(state, tok)
    tok, toks, lps, lengths, done = pick(i, logits, toks, lps, lengths, done)
    return i + 1, tok, state, toks, lps, lengths, done

  carry = (jnp.asarray(1, jnp.int32), tok, state, toks, lps, lengths, done)
  _, _, state, toks, lps, lengths, _ = jax.lax.while_loop(cond, body, carry)
  return toks, lps, lengths, state


def hf_positions(valid):
  """Position ids of a left-padded batch as HF generate computes them: cumsum(valid) - 1, 0 on pads."""
  valid = jnp.asarray(valid, bool)
  return jnp.where(valid, jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0).astype(jnp.int32)


def prefill(cfg: DecoderConfig, params, tokens, valid, *, cache_length: int, hooks: Hooks = PLAIN, extra=None,
            cache_dtype=None):
  """Runs the left-padded prompt [B, P] through the decoder into a fresh cache of `cache_length` slots.

  Returns (logits after the last prompt token [B, V] fp32, decoder state for `decoder_step`).
  """
  b, p = tokens.shape
  dtype = cache_dtype or params["embed"].dtype
  cache = KVCache.empty(cfg, b, cache_length, dtype)
  logits, aux = forward(cfg, params, tokens, positions=hf_positions(valid), valid=valid, cache=cache,
                        hooks=hooks, extra=extra)
  next_pos = jnp.sum(valid, axis=-1).astype(jnp.int32)
  return logits[:, -1], (aux["cache"], next_pos)


def decoder_step(cfg: DecoderConfig, params, state, tokens, *, hooks: Hooks = PLAIN, extra=None):
  """One token per row through the decoder with its cache: the `step_fn` of `decode`."""
  cache, pos = state
  b = tokens.shape[0]
  logits, aux = forward(cfg, params, tokens[:, None], positions=pos[:, None], valid=jnp.ones((b, 1), bool),
                        cache=cache, hooks=hooks, extra=extra)
  return logits[:, 0], (aux["cache"], pos + 1)


def default_pad_id(cfg: DecoderConfig, eos_ids: Sequence[int] = ()) -> int:
  """The config's pad id, else the first EOS id (what HF falls back to), else 0."""
  if cfg.pad_token_id is not None:
    return int(cfg.pad_token_id)
  eos = tuple(eos_ids) or tuple(cfg.eos_token_ids)
  return int(eos[0]) if eos else 0


def resolve_layer_loop(layer_loop: str) -> str:
  """"scan" | "unroll" from "scan" | "unroll" | "auto" (unroll on the CPU backend)."""
  if layer_loop == "auto":
    return "unroll" if jax.default_backend() == "cpu" else "scan"
  if layer_loop not in ("scan", "unroll"):
    raise ValueError(f"layer_loop must be 'auto', 'scan' or 'unroll', got {layer_loop!r}")
  return layer_loop


def generate_arrays(cfg: DecoderConfig, params, tokens, valid, key, *, max_new_tokens: int, temperature=0.0,
                    top_k: int = 0, top_p=1.0, eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                    done=None, hooks: Hooks = PLAIN, extra=None, layer_loop: str = "auto"):
  """Generates from a left-padded batch: tokens/valid [B, P] (the last column must be a real token).

  Pure and unjitted: wrap it in `jax.jit` (cfg, max_new_tokens, top_k, eos_ids, pad_id, hooks,
  layer_loop static) or `jax.vmap` it over a stack of `params`. eos_ids None = the config's.
  layer_loop: how decode steps run the layers (module docstring).
  Returns (new_tokens [B, N] int32 padded with pad_id, logprobs [B, N] fp32, lengths [B] int32).
  """
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  eos_ids = tuple(cfg.eos_token_ids) if eos_ids is None else tuple(eos_ids)
  pad_id = default_pad_id(cfg, eos_ids) if pad_id is None else int(pad_id)
  tokens = jnp.asarray(tokens, jnp.int32)
  valid = jnp.asarray(valid, bool)
  # The last generated token is never fed back, so the cache needs P + N - 1 slots.
  cache_length = tokens.shape[1] + int(max_new_tokens) - 1
  logits, state = prefill(cfg, params, tokens, valid, cache_length=cache_length, hooks=hooks, extra=extra)
  if resolve_layer_loop(layer_loop) == "unroll":
    params = {**params, "layers": unstack_layers(params["layers"])}
    state = (unstack_cache(state[0]), state[1])
  step = functools.partial(decoder_step, cfg, params, hooks=hooks, extra=extra)
  toks, lps, lengths, _ = decode(step, state, logits, key, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id, done=done)
  return toks, lps, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "top_k", "nucleus", "eos_ids",
                                             "pad_id", "hooks", "layer_loop"))
def _generate_jit(cfg, params, tokens, valid, done, key, temperature, top_p, extra, *, max_new_tokens, greedy,
                  top_k, nucleus, eos_ids, pad_id, hooks, layer_loop):
  return generate_arrays(cfg, params, tokens, valid, key, max_new_tokens=max_new_tokens,
                         temperature=0.0 if greedy else temperature, top_k=top_k,
                         top_p=top_p if nucleus else 1.0, eos_ids=eos_ids, pad_id=pad_id, done=done,
                         hooks=hooks, extra=extra, layer_loop=layer_loop)


def bucket(n: int, multiple: int) -> int:
  """n rounded up to a power of two below `multiple`, to a multiple of `multiple` from there."""
  n = max(int(n), 1)
  if n <= multiple:
    return 1 << (n - 1).bit_length()
  return -(-n // multiple) * multiple


def _eos_tuple(eos_token_id, cfg: DecoderConfig) -> tuple[int, ...]:
  if eos_token_id is None:
    return tuple(int(e) for e in cfg.eos_token_ids)
  if isinstance(eos_token_id, (int, np.integer)):
    return (int(eos_token_id),)
  return tuple(int(e) for e in eos_token_id)


def generate(model, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_token_id=None, return_logprobs: bool = False, *,
             params=None, hooks: Hooks = PLAIN, extra=None, pad_batch: bool = True,
             prompt_multiple: int = 16, batch_multiple: int = 8, layer_loop: str = "auto"):
  """New token ids per prompt (list of lists), each ending at its first EOS (included) if any.

  model: a `Decoder` (its config and params are used; `params=` overrides the weights, e.g. a
  merged or adapted pytree). prompts: token-id lists of any lengths (>= 1 token each).
  eos_token_id: None = the config's `eos_token_ids`; an int or a list; `[]` = never stop early.
  hooks/extra go to `forward` (LoRA and similar methods). `extra` is passed as is: if its
  leaves carry a batch axis, set `pad_batch=False` so no dummy rows are added.
  With return_logprobs, returns (tokens, logprobs) with logprobs[i][j] the log-softmax of the
  raw (untempered, unfiltered) logits at tokens[i][j].
  The prompt length is bucketed (power of two up to `prompt_multiple`, then multiples of it)
  and so is the batch (`batch_multiple`), so one compiled program serves many shapes.
  layer_loop: "auto" | "scan" | "unroll", how decode steps run the layers (module docstring).
  """
  cfg = model.config
  params = model.params() if params is None else params
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    return ([], []) if return_logprobs else []
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
  eos_ids = _eos_tuple(eos_token_id, cfg)
  pad_id = default_pad_id(cfg, eos_ids)
  b = len(prompts)
  bb = bucket(b, batch_multiple) if pad_batch else b
  p = bucket(max(len(x) for x in prompts), prompt_multiple)
  tokens = np.full((bb, p), pad_id, np.int32)
  valid = np.zeros((bb, p), bool)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):] = x
    valid[i, p - len(x):] = True
  tokens[b:, -1] = pad_id  # dummy rows: one "real" token so every row has a last position
  valid[b:, -1] = True
  done = np.arange(bb) >= b
  greedy = temperature == 0
  toks, lps, lengths = _generate_jit(
      cfg, params, tokens, valid, done, jax.random.key(seed), jnp.float32(temperature if not greedy else 1.0),
      jnp.float32(top_p), extra, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=int(top_k),
      nucleus=top_p < 1.0, eos_ids=eos_ids, pad_id=pad_id, hooks=hooks, layer_loop=resolve_layer_loop(layer_loop))
  toks, lps, lengths = jax.device_get((toks, lps, lengths))
  out = [toks[i, :lengths[i]].tolist() for i in range(b)]
  if return_logprobs:
    return out, [lps[i, :lengths[i]].tolist() for i in range(b)]
  return out
