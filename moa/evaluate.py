"""Scoring routed LoRA experts: exact-match accuracy (greedy generation) and answer perplexity
per domain, for any routing rule `route_fn(tokens, prompt_valid, domain) -> route`.

The route is decided once per example from its prompt and then held fixed while the answer is
generated (or teacher-forced for perplexity), so generation is the core `decoding.generate`
with `LoRAHooks` and the route in `extra`: one compiled program per batch shape whatever the
mixture of experts in the batch.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.decoding import generate
from calm_jax.lora import LoRASpec
from calm_jax.models.decoder import PLAIN, Decoder, forward
from calm_jax.tasks import encode_batch, evaluate, make_eval_set, max_seq_len
from calm_jax.train import lm_loss
from moa import routers as R

RouteFn = Callable[[np.ndarray, np.ndarray, int], object]  # (tokens, prompt_valid, domain) -> [L,B] | [L,B,X]


def right_pad(prompts: list[list[int]], pad_id: int, multiple: int = 16):
  """Right-padded [B, T] tokens and validity; T rounded up to `multiple` (one compile per bucket)."""
  t = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  valid = np.zeros((len(prompts), t), bool)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
    valid[i, :len(p)] = True
  return tokens, valid


def moa_route(base: Decoder, spec: LoRASpec, experts, routers, mode: str, top_k: int = 1) -> RouteFn:
  """Routing by the routers (no labels): "layer", "vote" or "last"; top-1 or soft top-k."""
  if mode not in R.MODES:
    raise ValueError(f"unknown routing mode {mode!r}; expected one of {R.MODES}")
  hooks = R.MoAHooks(spec.targets, spec.scale, 0.0, top_k)
  params = base.params()

  def fn(tokens, valid, domain):
    return R.route(base.config, hooks, params, experts, routers, jnp.asarray(tokens), jnp.asarray(valid))[0][mode]

  return fn


def label_route(num_layers: int) -> RouteFn:
  """The oracle: the true domain label picks the expert."""
  return lambda tokens, valid, domain: np.full((num_layers, tokens.shape[0]), domain, np.int32)


def classifier_route(classifier, num_layers: int) -> RouteFn:
  def fn(tokens, valid, domain):
    pick = np.asarray(jnp.argmax(classifier(tokens, valid), -1), np.int32)
    return np.broadcast_to(pick, (num_layers, tokens.shape[0]))
  return fn


def label_free_routes(base: Decoder, spec: LoRASpec, experts, routers, classifier=None) -> dict[str, RouteFn]:
  """Every routing mode a table reports: the routers' "layer" / "vote" / "last" (no labels), the oracle (the
  label picks the expert) and, given one, the separate classifier."""
  L = base.config.num_layers
  routes = {f"moa_{m}": moa_route(base, spec, experts, routers, m) for m in ("layer", "vote", "last")}
  routes["oracle"] = label_route(L)
  if classifier is not None:
    routes["classifier"] = classifier_route(classifier, L)
  return routes


def routed_accuracy(base: Decoder, spec: LoRASpec, experts, route_fn: RouteFn, tokenizer, domains, *,
                    n_per_task: int, split: str = "test", batch_size: int = 256, registry=None,
                    eval_domains=None) -> dict[str, float]:
  """Exact-match accuracy per domain (the domain id of each task is its index in `domains`)."""
  hooks = spec.hooks()
  params = base.params()
  out = {}
  for name in (eval_domains or domains):
    d = list(domains).index(name)
    examples = make_eval_set([name], n_per_task, split=split, registry=registry)

    def gen(prompts, n, d=d):
      tokens, valid = right_pad(prompts, tokenizer.pad_id)
      extra = {"lora": experts, "route": jnp.asarray(route_fn(tokens, valid, d))}
      return generate(base, prompts, max_new_tokens=n, params=params, hooks=hooks, extra=extra, pad_batch=False)

    out[name] = evaluate(gen, tokenizer, examples, batch_size=batch_size, registry=registry)[name]
  return out


def plain_accuracy(model: Decoder, tokenizer, names, *, n_per_task: int, split: str = "test", batch_size: int = 256,
                   registry=None) -> dict[str, float]:
  """Accuracy of a plain decoder (the base, or a LoRA merged into it)."""
  out = {}
  for name in names:
    examples = make_eval_set([name], n_per_task, split=split, registry=registry)
    gen = lambda prompts, n: generate(model, prompts, max_new_tokens=n)
    out[name] = evaluate(gen, tokenizer, examples, batch_size=batch_size, registry=registry)[name]
  return out


def _batch(name, n_per_task, split, registry, tokenizer, multiple: int = 16):
  """Teacher-forcing batch of one domain's eval examples, with the prompt mask routers pool over."""
  examples = make_eval_set([name], n_per_task, split=split, registry=registry)
  task = registry.get(name) if registry and name in registry else None
  seq_len = -(-max_seq_len([task if task is not None else name]) // multiple) * multiple
  b = encode_batch(examples, tokenizer, seq_len)
  t = np.arange(b["inputs"].shape[1])
  b["prompt_valid"] = t[None, :] < b["prompt_len"][:, None]
  return b


def routed_perplexity(base: Decoder, spec: LoRASpec | None, experts, route_fn: RouteFn | None, tokenizer, domains, *,
                      n_per_task: int, split: str = "test", registry=None, eval_domains=None) -> dict[str, float]:
  """exp(mean NLL of the answer tokens + eos) per domain, teacher-forced, route from the prompt.

  spec/experts/route_fn None: the plain model `base` (e.g. the base or a merged LoRA).
  """
  cfg, params = base.config, base.params()
  out = {}
  for name in (eval_domains or domains):
    d = list(domains).index(name)
    b = _batch(name, n_per_task, split, registry, tokenizer)
    tokens, valid = jnp.asarray(b["inputs"]), jnp.asarray(b["attention_mask"]).astype(bool)
    if route_fn is None:
      logits = _logits_jit(cfg, None, params, None, tokens, valid)
    else:
      extra = {"lora": experts, "route": jnp.asarray(route_fn(b["inputs"], b["prompt_valid"], d))}
      logits = _logits_jit(cfg, spec.hooks(), params, extra, tokens, valid)
    nll, _ = lm_loss(logits, jnp.asarray(b["targets"]), jnp.asarray(b["loss_mask"]))
    out[name] = float(math.exp(float(nll)))
  return out


@functools.partial(jax.jit, static_argnames=("cfg", "hooks"))
def _logits_jit(cfg, hooks, params, extra, tokens, valid):
  return forward(cfg, params, tokens, valid=valid, hooks=hooks or PLAIN, extra=extra)[0]


def router_accuracy(base: Decoder, spec: LoRASpec, experts, routers, tokenizer, domains, *, n_per_task: int,
                    split: str = "test", registry=None) -> dict[str, float]:
  """Per layer: fraction of held-out labelled prompts whose router argmax is the true domain
  (routing pass of the "layer" mode: each layer's router sees the stream its predecessors routed)."""
  hooks = R.MoAHooks(spec.targets, spec.scale, 0.0, 1)
  hits, total = None, 0
  for d, name in enumerate(domains):
    b = _batch(name, n_per_task, split, registry, tokenizer)
    _, probs = R.route(base.config, hooks, base.params(), experts, routers, jnp.asarray(b["inputs"]),
                       jnp.asarray(b["prompt_valid"]))
    h = np.asarray(jnp.argmax(probs, -1) == d).sum(1)  # [L]
    hits = h if hits is None else hits + h
    total += b["inputs"].shape[0]
  return {str(layer): float(hits[layer] / total) for layer in range(len(hits))}
