"""Routers: one per transformer layer, choosing among the LoRA experts from that layer's input.

    p_l(x) = softmax(W_l · n(mean_{t in prompt} h_l[t]) + b_l)        W_l [E, X], b_l [X]

h_l is the residual stream entering layer l (`forward(..., return_hidden=True)` gives it as
hidden[l]); the mean is over the prompt's valid tokens (what exists at inference, before any
answer token), n is a parameter-free RMS normalisation (the residual stream grows with depth,
so one learning rate suits every layer's router).

Inference without labels (`route`): one pass over the prompt in which layer l's router picks
the expert(s) of layer l (`MoAHooks`), then
  "layer": each layer uses its own router's choice,
  "vote":  every layer uses the expert most layers chose (ties: higher mean probability; soft
           top-k weights ∝ votes + mean probability / 2),
  "last":  every layer uses the last layer's router's choice;
top_k = 1 routes hard (an index per example), top_k > 1 mixes the k most probable experts with
their renormalised probabilities (a mixture of the experts' outputs).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.lora import LoRAHooks
from calm_jax.models.config import DecoderConfig
from calm_jax.models.decoder import forward

MODES = ("layer", "vote", "last")


def router_axes() -> dict[str, tuple[str, ...]]:
  return {"w": ("layers", "embed", "experts"), "b": ("layers", "experts")}


def init_routers(cfg: DecoderConfig, num_experts: int, seed: int = 0, dtype=jnp.float32) -> dict:
  """Small random W (std 1/sqrt(E)·0.1) and zero bias: near-uniform routing at the start."""
  rng = np.random.default_rng(seed)
  L, E = cfg.num_layers, cfg.hidden_size
  w = 0.1 / np.sqrt(E) * rng.standard_normal((L, E, num_experts))
  return {"w": jnp.asarray(w, dtype), "b": jnp.zeros((L, num_experts), dtype)}


def extend_routers(routers: dict, seed: int = 0) -> dict:
  """Routers with one more expert column (new W column small random, its bias zero)."""
  rng = np.random.default_rng(seed)
  L, E, _ = routers["w"].shape
  col = 0.1 / np.sqrt(E) * rng.standard_normal((L, E, 1))
  return {"w": jnp.concatenate([routers["w"], jnp.asarray(col, routers["w"].dtype)], axis=-1),
          "b": jnp.concatenate([routers["b"], jnp.zeros((L, 1), routers["b"].dtype)], axis=-1)}


def pool(h, mask, eps: float = 1e-6):
  """RMS-normalised mean of h [B, T, E] over mask [B, T] (fp32)."""
  m = mask.astype(jnp.float32)[..., None]
  mean = (h.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  return mean * jax.lax.rsqrt(jnp.mean(mean * mean, -1, keepdims=True) + eps)


def layer_logits(w, b, h, mask):
  """One layer's router logits [B, X]."""
  return pool(h, mask) @ w.astype(jnp.float32) + b.astype(jnp.float32)


def all_logits(routers, hidden, mask):
  """Logits [L, B, X] of every layer's router from hidden [L+1, B, T, E] (entries 0..L-1 enter layers)."""
  L = routers["w"].shape[0]
  return jax.vmap(layer_logits, in_axes=(0, 0, 0, None))(routers["w"], routers["b"], hidden[:L], mask)


def decide(logits, top_k: int):
  """Hard index [..., B] (top_k <= 1) or soft top-k weights [..., B, X] from logits [..., B, X]."""
  if top_k <= 1:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  k = min(top_k, logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  masked = jnp.where(logits >= kth, logits, -jnp.inf)
  return jax.nn.softmax(masked, -1)


@dataclasses.dataclass(frozen=True)
class MoAHooks(LoRAHooks):
  """LoRA experts routed by each layer's router from the residual stream entering the layer.

  extra: {"lora": experts, "router": {"w": [L, E, X], "b": [L, X]}}; pooling over the valid
  keys (the prompt: run it on prompt tokens only).
  """
  top_k: int = 1

  def begin_layer(self, h, extra, kv_valid):
    r = extra["router"]
    return {"route": decide(layer_logits(r["w"], r["b"], h, kv_valid), self.top_k)}


@functools.partial(jax.jit, static_argnames=("cfg", "hooks"))
def route(cfg: DecoderConfig, hooks: MoAHooks, params, experts, routers, tokens, valid):
  """Routing decisions of every mode for prompts tokens/valid [B, P] (right padded), from one pass.

  Returns ({mode: route for the LoRA `extra`: [L, B] int (top-1) or [L, B, X] weights (top-k)},
  router probabilities [L, B, X] of the routing pass).
  """
  _, aux = forward(cfg, params, tokens, valid=valid, hooks=hooks, extra={"lora": experts, "router": routers},
                   return_hidden=True)
  logits = all_logits(routers, aux["hidden"], valid)
  probs = jax.nn.softmax(logits, -1)
  L = logits.shape[0]
  votes = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]).sum(0)  # [B, X]
  # votes, ties broken by the mean probability (< 1, so it never outweighs a vote); soft top-k ∝ this score
  vote_score = jnp.log(votes + 0.5 * probs.mean(0))
  every = lambda one: jnp.broadcast_to(one, (L, *one.shape))
  routes = {"layer": decide(logits, hooks.top_k), "vote": every(decide(vote_score, hooks.top_k)),
            "last": every(decide(logits[-1], hooks.top_k))}
  return routes, probs
