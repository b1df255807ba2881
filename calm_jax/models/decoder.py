"""The llama / mistral / qwen2 decoder as a Flax NNX module over stacked layer parameters.

Parameters live in a nested dict `{"embed", "layers": {...}, "final_norm", "lm_head"}` whose
layer entries are stacked on a leading `layers` axis, so the forward pass is one `lax.scan`
that compiles once whatever the depth. The module is a thin holder: `forward` is a pure
function of that dict, which is what jitted kernels, merges and method packages use.

Method hooks: `forward(..., hooks=H, extra=E)` scans `E` (leaves stacked on the layer axis)
alongside the layers and routes every projection through `H.dense`, so LoRA, routers and
similar per-layer additions need no copy of this file.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm_jax.models.config import DecoderConfig
from calm_jax.models.layers import apply_rope, attention_mask, gqa_attention, rms_norm, rope_tables

# Einsum of each projection: activations x weight -> output.
DENSE_EQ = {
    "q": "bte,ehd->bthd", "k": "bte,ehd->bthd", "v": "bte,ehd->bthd", "o": "bthd,hde->bte",
    "gate": "bte,ef->btf", "up": "bte,ef->btf", "down": "btf,fe->bte",
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str, ...]  # logical axis names, mapped onto a mesh by calm_jax.sharding
  init: str  # "normal" | "ones" | "zeros"


def param_specs(cfg: DecoderConfig) -> dict[str, ParamSpec]:
  """Flat `"/"`-joined name -> spec for every parameter of the decoder."""
  L, E, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  s = {
      "embed": ParamSpec((V, E), ("vocab", "embed"), "normal"),
      "layers/attn_norm": ParamSpec((L, E), ("layers", "embed"), "ones"),
      "layers/q": ParamSpec((L, E, H, D), ("layers", "embed", "heads", "head_dim"), "normal"),
      "layers/k": ParamSpec((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
      "layers/v": ParamSpec((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
      "layers/o": ParamSpec((L, H, D, E), ("layers", "heads", "head_dim", "embed"), "normal"),
      "layers/mlp_norm": ParamSpec((L, E), ("layers", "embed"), "ones"),
      "layers/gate": ParamSpec((L, E, F), ("layers", "embed", "mlp"), "normal"),
      "layers/up": ParamSpec((L, E, F), ("layers", "embed", "mlp"), "normal"),
      "layers/down": ParamSpec((L, F, E), ("layers", "mlp", "embed"), "normal"),
      "final_norm": ParamSpec((E,), ("embed",), "ones"),
  }
  if cfg.qkv_bias:
    s["layers/q_bias"] = ParamSpec((L, H, D), ("layers", "heads", "head_dim"), "zeros")
    s["layers/k_bias"] = ParamSpec((L, KV, D), ("layers", "kv_heads", "head_dim"), "zeros")
    s["layers/v_bias"] = ParamSpec((L, KV, D), ("layers", "kv_heads", "head_dim"), "zeros")
  if cfg.o_bias:
    s["layers/o_bias"] = ParamSpec((L, E), ("layers", "embed"), "zeros")
  if cfg.mlp_bias:
    s["layers/gate_bias"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
    s["layers/up_bias"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
    s["layers/down_bias"] = ParamSpec((L, E), ("layers", "embed"), "zeros")
  if not cfg.tie_word_embeddings:
    s["lm_head"] = ParamSpec((E, V), ("embed", "vocab"), "normal")
  return s


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, v in flat.items():
    *parents, leaf = name.split("/")
    d = out
    for p in parents:
      d = d.setdefault(p, {})
    d[leaf] = v
  return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def init_params(cfg: DecoderConfig, seed=0, dtype=jnp.float32, std: float = 0.02) -> dict[str, Any]:
  """Random parameters (normal(0, std) kernels, unit norms, zero biases) as a nested dict.

  Drawn on the host with numpy (no XLA compile per shape); `seed` is an int or a jax key.
  """
  if not isinstance(seed, (int, np.integer)):
    seed = np.asarray(jax.random.key_data(seed)).astype(np.uint32).tolist()
  rng = np.random.default_rng(seed)
  flat = {}
  for name, spec in sorted(param_specs(cfg).items()):
    if spec.init == "normal":
      value = (std * rng.standard_normal(spec.shape, dtype=np.float32))
    elif spec.init == "ones":
      value = np.ones(spec.shape, np.float32)
    else:
      value = np.zeros(spec.shape, np.float32)
    flat[name] = jnp.asarray(value, dtype)
  return nest(flat)


class Hooks:
  """Per-layer extension points; the default is the plain decoder.

  Subclasses must be hashable (they are static arguments of jitted functions).
  """

  def begin_layer(self, h, extra, kv_valid):
    """Called with the residual stream entering a layer; returns a context for `dense`."""
    return None

  def dense(self, name, x, w, extra, ctx):
    return dense(name, x, w)


def dense(name, x, w):
  """The projection `name` of activations x by weight w (DENSE_EQ). The output projection runs as
  one [H*D, E] matmul: as the einsum, XLA on CPU transposes the weight to the attention output's
  layout, a weight-sized copy per call."""
  if name == "o":
    return jnp.einsum("btf,fe->bte", x.reshape(*x.shape[:2], -1), w.reshape(-1, w.shape[-1]))
  return jnp.einsum(DENSE_EQ[name], x, w)


PLAIN = Hooks()


class KVCache(NamedTuple):
  """Keys/values [L, B, KV, S, D] (heads-major: what the attention dots read without a transpose),
  slot validity [B, S], next write slot."""
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, cfg: DecoderConfig, batch: int, length: int, dtype) -> "KVCache":
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def embed(params, tokens):
  return jnp.take(params["embed"], tokens, axis=0)


def unembed(cfg: DecoderConfig, params, h):
  """Final norm and logits (fp32)."""
  x = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
  w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return jnp.einsum("bte,ev->btv", x, w, preferred_element_type=jnp.float32)


def _layer(cfg, hooks, h, p, window, kv_cache, extra, *, cos, sin, q_slots, kv_valid, index, layer):
  """One pre-norm decoder block; returns (new h, the (k, v) cache with this layer's slots written, or None).

  kv_cache: (k, v) of all scanned layers [n, B, KV, S, D] (a scan carry, so the write is in place
  instead of re-stacking a copy of the whole cache per layer) with `layer` indexing into it; or,
  with layer=None, this layer's own (k, v) [B, KV, S, D] (unstacked layers).
  """
  ctx = hooks.begin_layer(h, extra, kv_valid)
  x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
  q = hooks.dense("q", x, p["q"], extra, ctx)
  k = hooks.dense("k", x, p["k"], extra, ctx)
  v = hooks.dense("v", x, p["v"], extra, ctx)
  if cfg.qkv_bias:
    q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  if kv_cache is not None:
    kc, vc = kv_cache
    if layer is None:
      k = kc = jax.lax.dynamic_update_slice(kc, k.swapaxes(1, 2).astype(kc.dtype), (0, 0, index, 0))
      v = vc = jax.lax.dynamic_update_slice(vc, v.swapaxes(1, 2).astype(vc.dtype), (0, 0, index, 0))
    else:
      kc = jax.lax.dynamic_update_slice(kc, k.swapaxes(1, 2)[None].astype(kc.dtype), (layer, 0, 0, index, 0))
      vc = jax.lax.dynamic_update_slice(vc, v.swapaxes(1, 2)[None].astype(vc.dtype), (layer, 0, 0, index, 0))
      k = jax.lax.dynamic_index_in_dim(kc, layer, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(vc, layer, keepdims=False)
    kv_cache = (kc, vc)
  mask = attention_mask(q_slots, kv_valid, window if cfg.has_sliding_window else None)
  a = gqa_attention(q, k, v, mask, heads_major=kv_cache is not None)
  a = hooks.dense("o", a, p["o"], extra, ctx)
  if cfg.o_bias:
    a = a + p["o_bias"]
  h = h + a.astype(h.dtype)
  x = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)
  g = hooks.dense("gate", x, p["gate"], extra, ctx)
  u = hooks.dense("up", x, p["up"], extra, ctx)
  if cfg.mlp_bias:
    g, u = g + p["gate_bias"], u + p["up_bias"]
  m = hooks.dense("down", jax.nn.silu(g) * u, p["down"], extra, ctx)
  if cfg.mlp_bias:
    m = m + p["down_bias"]
  return h + m.astype(h.dtype), kv_cache


def unstack_layers(layers) -> list:
  """The stacked layer dict as a list of per-layer dicts (static slices)."""
  n = jax.tree.leaves(layers)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)]


def unstack_cache(cache: KVCache) -> KVCache:
  """A stacked cache as per-layer tuples of [B, KV, S, D] (the layout of unstacked layers)."""
  n = cache.k.shape[0]
  return KVCache(tuple(cache.k[i] for i in range(n)), tuple(cache.v[i] for i in range(n)), cache.valid, cache.index)


def run_layers(cfg: DecoderConfig, layers, h, *, positions, kv_valid, cache: KVCache | None = None,
               layer_ids=None, hooks: Hooks = PLAIN, extra=None, return_hidden=False, remat=False):
  """Scans a stack of layers (any contiguous slice of them) over the residual stream h [B,T,E].

  kv_valid: [B, S] validity of attention keys (S = T without a cache, cache length with one).
  layer_ids: global indices of the stacked layers (for per-layer sliding windows); all by default.
  `layers` may also be a list of per-layer dicts (`unstack_layers`), with the cache's k/v as
  per-layer tuples (`unstack_cache`): the layers then run as an unrolled Python loop, each
  reading its own weight buffers. That is the decode path on CPU, where the scan's per-step
  dynamic slice of every stacked weight is a copy (see `calm_jax.decoding`, `layer_loop`).
  Returns (h, new_cache_kv or None, hidden [n, B, T, E] or None).
  """
  unstacked = isinstance(layers, (list, tuple))
  n = len(layers) if unstacked else jax.tree.leaves(layers)[0].shape[0]
  if layer_ids is None:
    layer_ids = np.arange(n)
  cos, sin = rope_tables(cfg, positions)
  t = h.shape[1]
  index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
  q_slots = index + jnp.arange(t)
  body = functools.partial(_layer, cfg, hooks, cos=cos, sin=sin, q_slots=q_slots,
                           kv_valid=kv_valid, index=index)
  if unstacked:
    ks, vs, hidden = [], [], []
    for i, p in enumerate(layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      ex = None if extra is None else jax.tree.map(lambda x, i=i: x[i], extra)
      layer = functools.partial(body, window=int(cfg.layer_windows[int(layer_ids[i])]), layer=None)
      h, kv = (jax.checkpoint(layer) if remat else layer)(h, p, kv_cache=kv, extra=ex)
      if kv is not None:
        ks.append(kv[0])
        vs.append(kv[1])
      if return_hidden:
        hidden.append(h)
    return h, (None if cache is None else (tuple(ks), tuple(vs))), (jnp.stack(hidden) if return_hidden else None)

  windows = jnp.asarray(np.asarray(cfg.layer_windows, np.int32)[np.asarray(layer_ids)])

  def step(carry, xs):
    h, kv = carry
    p, w, ex, i = xs
    h2, kv = body(h, p, w, kv, ex, layer=i)
    return (h2, kv), (h2 if return_hidden else None)

  if remat:
    step = jax.checkpoint(step)
  kv = (cache.k, cache.v) if cache is not None else None
  (h, kv), hidden = jax.lax.scan(step, (h, kv), (layers, windows, extra, jnp.arange(n)))
  return h, kv, hidden


def forward(cfg: DecoderConfig, params, tokens, *, positions=None, valid=None, cache: KVCache | None = None,
            hooks: Hooks = PLAIN, extra=None, return_hidden=False, remat=False):
  """Logits [B, T, V] (fp32) for tokens [B, T].

  valid: [B, T] bool (padding = False). positions default to 0..T-1 (as HF does without
  position_ids). With a cache, the T tokens are written at slots cache.index.. and attend to
  every valid earlier slot; the returned cache has index advanced by T.
  Returns (logits, aux) with aux = {"cache": KVCache | None, "hidden": [L+1, B, T, E] | None};
  hidden[0] is the embedding output and hidden[i] the residual stream after layer i.
  """
  b, t = tokens.shape
  if valid is None:
    valid = jnp.ones((b, t), bool)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  h = embed(params, tokens)
  if cache is not None:
    kv_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
  else:
    kv_valid = valid
  h0 = h
  h, kv, hidden = run_layers(cfg, params["layers"], h, positions=positions, kv_valid=kv_valid, cache=cache,
                             hooks=hooks, extra=extra, return_hidden=return_hidden, remat=remat)
  logits = unembed(cfg, params, h)
  new_cache = None
  if cache is not None:
    new_cache = KVCache(kv[0], kv[1], kv_valid, cache.index + t)
  if return_hidden:
    hidden = jnp.concatenate([h0[None], hidden], axis=0)
  return logits, {"cache": new_cache, "hidden": hidden}


@functools.partial(jax.jit, static_argnames=("cfg", "return_hidden"))
def _apply(cfg, params, tokens, valid, positions, return_hidden=False):
  return forward(cfg, params, tokens, valid=valid, positions=positions, return_hidden=return_hidden)


class _Layers(nnx.Module):
  """Holder of the stacked per-layer parameters."""


class Decoder(nnx.Module):
  """HF-compatible decoder; `Decoder(cfg, rngs=nnx.Rngs(0))` or built by `calm_jax.hf.load`."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
               params: dict[str, Any] | None = None):
    self.config = config
    if params is None:
      params = init_params(config, rngs.params() if rngs is not None else 0, dtype)
    specs = param_specs(config)
    flat = flatten(params)
    missing = sorted(set(specs) - set(flat))
    extra = sorted(set(flat) - set(specs))
    if missing or extra:
      raise ValueError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
    self.layers = _Layers()
    for name, spec in specs.items():
      value = jnp.asarray(flat[name])
      if value.shape != spec.shape:
        raise ValueError(f"parameter {name}: shape {value.shape}, config expects {spec.shape}")
      owner, leaf = (self.layers, name.split("/")[1]) if name.startswith("layers/") else (self, name)
      setattr(owner, leaf, nnx.Param(value, axes=spec.axes))

  @property
  def dtype(self):
    return self.embed[...].dtype

  def params(self) -> dict[str, Any]:
    """The parameters as a plain nested dict of arrays (what pure kernels take)."""
    flat = {}
    for name in param_specs(self.config):
      owner, leaf = (self.layers, name.split("/")[1]) if name.startswith("layers/") else (self, name)
      flat[name] = getattr(owner, leaf)[...]
    return nest(flat)

  def __call__(self, input_ids, attention_mask=None, positions=None, return_hidden=False):
    tokens = jnp.asarray(input_ids, jnp.int32)
    valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    if valid is None:
      valid = jnp.ones(tokens.shape, bool)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, aux = _apply(self.config, self.params(), tokens, valid, jnp.asarray(positions, jnp.int32),
                         return_hidden=return_hidden)
    return (logits, aux["hidden"]) if return_hidden else logits
