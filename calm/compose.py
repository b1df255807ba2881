"""CALM composition (Bansal et al. 2024, §3.1): a frozen anchor m_B reads frozen augmenting
models m_A through learned projections and cross-attention.

Per connection (m_A layer i, anchor layer j):

  K, V = f_proj(H_A,i) W_K, f_proj(H_A,i) W_V      f_proj: RMSNorm then Linear d_A -> d_B (+ bias)
  Q    = RMSNorm(H_B,j) W_Q
  H_B,j <- H_B,j + Attn(Q, K, V) W_O               (feeds anchor layer j+1)

with a causal cross mask (anchor position t reads m_A positions <= t, padding masked), so a
teacher-forced pass equals the paper's iterative decoding where every generated token is fed
to both models. W_O starts at zero: at init the composed model is the anchor, exactly.

`cross_rope` (an extension; off by default, as in the paper) rotates Q and K by their positions
(rotary, the anchor's theta), so a connection can address m_A's states by offset: "the same
position" is one learnable pattern instead of a content match the anchor's states must support.
`cross_null` (an extension; off by default) adds one learned key per head whose value is zero
(`add_zero_attn` with a learned key): a query can attend to it and take nothing, so positions that
should read nothing from m_A (an operand the anchor already understands) need no m_A state that
projects to zero.

Across tokenizers (`own_tokens`, calm/spans.py): an augmenting model may read its own tokenization
of the same text (`AugStream`: tokens, valid, positions and end keys [B, S]); anchor position t then
reads its position s iff the character span of s ends at or before that of anchor token t
(`cross_mask`: `aug_end[s] <= anchor_end[t]`), so nothing after anchor token t's last character
reaches the anchor's logits at t. With identical tokenizations the end keys increase with the
position and this is the causal mask above, exactly.

Parameters are one pure pytree `{"anchor", "augments": (..), "compose": (..)}`; per augmenting
model the connection parameters are stacked on a leading axis. The anchor runs as contiguous
segments of its layer stack (`run_layers`) with the cross-attentions between them; the
augmenting models run whole (`forward(..., return_hidden=True)`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm.connections import CompositionError, resolve
from calm_jax.models import decoder as dec
from calm_jax.models.config import DecoderConfig
from calm_jax.models.layers import apply_rope, attention_mask, gqa_attention, rms_norm, rope_tables
from calm_jax.variables import ComposeParam


@dataclasses.dataclass(frozen=True)
class CompositionSpec:
  """Static description of a composition (hashable: a static argument of jitted kernels).

  connections[m]: ((augment layer, anchor layer), ...) of augmenting model m, 1-based (anchor
  layer 0: the embedding output).
  aug_mode: "iterative" (paper: m_A reads every token, generated ones included) or "encoder"
  (the ablation: m_A reads only the prompt).
  """
  anchor: DecoderConfig
  augments: tuple[DecoderConfig, ...]
  connections: tuple[tuple[tuple[int, int], ...], ...]
  num_heads: int
  head_dim: int
  aug_mode: str = "iterative"
  cross_rope: bool = False
  cross_null: bool = False
  own_tokens: tuple[bool, ...] = ()

  def own(self, m: int) -> bool:
    """Whether augmenting model m reads its own token stream (another tokenizer) rather than the anchor's."""
    return bool(self.own_tokens) and self.own_tokens[m]

  @classmethod
  def make(cls, anchor: DecoderConfig, augments: Sequence[DecoderConfig], *, augment_layers=None,
           anchor_layers=None, num_heads: int | None = None, aug_mode: str = "iterative",
           cross_rope: bool = False, cross_null: bool = False, own_tokens=None) -> "CompositionSpec":
    """augment_layers / anchor_layers: one list per augmenting model (None = the defaults).
    own_tokens: per augmenting model, True when it has its own tokenizer (None = all share the anchor's)."""
    augments = tuple(augments)
    if not augments:
      raise CompositionError("CALM needs at least one augmenting model")
    per = lambda x: [None] * len(augments) if x is None else list(x)
    aug_l, anc_l = per(augment_layers), per(anchor_layers)
    if len(aug_l) != len(augments) or len(anc_l) != len(augments):
      raise CompositionError(f"{len(augments)} augmenting models but {len(aug_l)} augment_layers lists and "
                             f"{len(anc_l)} anchor_layers lists")
    own = tuple(bool(x) for x in own_tokens) if own_tokens is not None else (False,) * len(augments)
    if len(own) != len(augments):
      raise CompositionError(f"{len(augments)} augmenting models but {len(own)} own_tokens flags")
    conns = tuple(resolve(anchor, a, al, bl, name=f"augment {m}", shared_tokens=not o)
                  for m, (a, al, bl, o) in enumerate(zip(augments, aug_l, anc_l, own)))
    heads = int(num_heads or anchor.num_heads)
    if heads < 1 or anchor.hidden_size % heads:
      raise CompositionError(f"num_heads {heads} must divide the anchor width {anchor.hidden_size}")
    if aug_mode not in ("iterative", "encoder"):
      raise CompositionError(f"aug_mode must be 'iterative' or 'encoder', got {aug_mode!r}")
    head_dim = anchor.hidden_size // heads
    if cross_rope and head_dim % 2:
      raise CompositionError(f"cross_rope needs an even cross-attention head size, got {head_dim}")
    if any(own) and cross_rope:
      raise CompositionError("cross_rope rotates by token positions, which two tokenizers do not share; "
                             "turn it off for an augmenting model with its own tokenizer")
    if any(own) and aug_mode != "iterative":
      raise CompositionError("an augmenting model with its own tokenizer needs aug_mode 'iterative'")
    return cls(anchor, augments, conns, heads, head_dim, aug_mode, bool(cross_rope), bool(cross_null),
               own if any(own) else ())

  def boundaries(self) -> tuple[int, ...]:
    """Anchor layers after which some cross-attention is added, sorted."""
    return tuple(sorted({j for conns in self.connections for _, j in conns}))


def compose_param_specs(spec: CompositionSpec) -> list[dict[str, dec.ParamSpec]]:
  """Per augmenting model: name -> shape, logical axes, init of its stacked connection parameters."""
  eb, h, d = spec.anchor.hidden_size, spec.num_heads, spec.head_dim
  out = []
  for cfg, conns in zip(spec.augments, spec.connections):
    c, ea = len(conns), cfg.hidden_size
    P = dec.ParamSpec
    out.append({
        "aug_norm": P((c, ea), ("layers", "embed"), "ones"),
        "proj": P((c, ea, eb), ("layers", "embed", "embed"), "fan_in"),
        "proj_bias": P((c, eb), ("layers", "embed"), "zeros"),
        "q_norm": P((c, eb), ("layers", "embed"), "ones"),
        "q": P((c, eb, h, d), ("layers", "embed", "heads", "head_dim"), "fan_in"),
        "k": P((c, eb, h, d), ("layers", "embed", "heads", "head_dim"), "fan_in"),
        "v": P((c, eb, h, d), ("layers", "embed", "heads", "head_dim"), "fan_in"),
        "o": P((c, h, d, eb), ("layers", "heads", "head_dim", "embed"), "zeros"),
    })
    if spec.cross_null:
      out[-1]["null_k"] = P((c, h, d), ("layers", "heads", "head_dim"), "zeros")
  return out


def init_compose_params(spec: CompositionSpec, seed: int = 0, dtype=jnp.float32, zero_output: bool = True):
  """Composition parameters: normal(0, 1/sqrt(fan_in)) projections, unit norms, zero biases and
  (zero_output) zero W_O, so the composed model starts as the anchor."""
  rng = np.random.default_rng([seed, 0xCA1])
  out = []
  for specs in compose_param_specs(spec):
    p = {}
    for name, s in specs.items():
      if s.init == "fan_in" or (s.init == "zeros" and name == "o" and not zero_output):
        fan_in = s.shape[1] if name != "o" else s.shape[1] * s.shape[2]
        p[name] = jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) / np.sqrt(fan_in), dtype)
      else:
        p[name] = (jnp.ones if s.init == "ones" else jnp.zeros)(s.shape, dtype)
    out.append(p)
  return tuple(out)


def cross_rope_tables(spec: CompositionSpec, positions):
  """cos/sin [B, T, D] of the cross-attention's rotary (`cross_rope`: the anchor's rotary at the
  cross-attention's head size), or None when it is off."""
  if not spec.cross_rope:
    return None
  return rope_tables(dataclasses.replace(spec.anchor, head_dim=spec.head_dim), positions)


def project_kv(cp, states, eps, rope=None):
  """Projected m_A states -> cross-attention keys/values [C, B, T, H, D] (f_proj, then W_K, W_V;
  keys rotated by `rope` = (cos, sin) when given)."""
  x = jax.vmap(lambda s, w: rms_norm(s, w, eps))(states, cp["aug_norm"])
  x = jnp.einsum("cbte,cef->cbtf", x, cp["proj"].astype(x.dtype)) + cp["proj_bias"][:, None, None]
  k = jnp.einsum("cbtf,cfhd->cbthd", x, cp["k"].astype(x.dtype))
  v = jnp.einsum("cbtf,cfhd->cbthd", x, cp["v"].astype(x.dtype))
  if rope is not None:
    k = jax.vmap(lambda kc: apply_rope(kc, *rope))(k)
  return k, v


def cross_attention(cp, c: int, h, k, v, mask, eps, rope=None):
  """Connection c of one augmenting model: the update added to the anchor stream h [B, T, E]."""
  x = rms_norm(h, cp["q_norm"][c], eps)
  q = jnp.einsum("bte,ehd->bthd", x, cp["q"][c].astype(x.dtype))
  if rope is not None:
    q = apply_rope(q, *rope)
  if "null_k" in cp:  # the null slot: a learned key, a zero value, always visible
    null = jnp.broadcast_to(cp["null_k"][c].astype(k.dtype), (k.shape[0], 1) + k.shape[2:])
    k, v = jnp.concatenate([null, k], 1), jnp.concatenate([jnp.zeros_like(null, v.dtype), v], 1)
    mask = jnp.concatenate([jnp.ones(mask.shape[:2] + (1,), bool), mask], -1)
  a = gqa_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
  return jnp.einsum("bthd,hde->bte", a, cp["o"][c].astype(a.dtype)).astype(h.dtype)


class AugStream(NamedTuple):
  """An augmenting model's own tokenization of the text (calm/spans.py): tokens, valid, positions and end
  keys, each [B, S]. End keys order character ends (spans.end_keys): slot s is readable from anchor
  token t iff ends[s] <= the anchor's end key at t."""
  tokens: jax.Array
  valid: jax.Array
  positions: jax.Array
  ends: jax.Array


class CalmCache(NamedTuple):
  """Decoding state of a composition: the anchor's self-attention cache per segment of its
  layer stack, one cache per augmenting model, the projected cross keys/values per augmenting
  model [C, B, S, H, D], slot validity (anchor [B, S], cross [B, S]) and the next write slot.

  own[m]: for an augmenting model with its own token stream, (valid [B, S_m], end keys [B, S_m]) of
  its slots, which it fills at its own pace (its KVCache's index); None for one that shares the
  anchor's slots."""
  anchor: tuple[tuple[jax.Array, jax.Array], ...]
  augments: tuple[dec.KVCache, ...]
  cross_k: tuple[jax.Array, ...]
  cross_v: tuple[jax.Array, ...]
  valid: jax.Array
  cross_valid: jax.Array
  index: jax.Array
  own: tuple = ()

  @classmethod
  def empty(cls, spec: CompositionSpec, batch: int, length: int, dtype, aug_lengths=None) -> "CalmCache":
    """aug_lengths[m]: the slots of augmenting model m when it has its own token stream."""
    a = spec.anchor
    segs = _segments(spec)
    shape = lambda n: (n, batch, a.num_kv_heads, length, a.head_dim)
    anchor = tuple((jnp.zeros(shape(e - s), dtype), jnp.zeros(shape(e - s), dtype)) for s, e in segs)
    n = [int(aug_lengths[m]) if spec.own(m) else length for m in range(len(spec.augments))]
    augs = tuple(dec.KVCache.empty(c, batch, n[m], dtype) for m, c in enumerate(spec.augments))
    cross = tuple(jnp.zeros((len(c), batch, n[m], spec.num_heads, spec.head_dim), dtype)
                  for m, c in enumerate(spec.connections))
    own = tuple((jnp.zeros((batch, n[m]), bool), jnp.zeros((batch, n[m]), jnp.int32)) if spec.own(m) else None
                for m in range(len(spec.augments)))
    return cls(anchor, augs, cross, cross, jnp.zeros((batch, length), bool), jnp.zeros((batch, length), bool),
               jnp.zeros((), jnp.int32), own)


def _segments(spec: CompositionSpec) -> list[tuple[int, int]]:
  """Contiguous [start, end) slices of the anchor stack, split after every connected layer."""
  cuts = [0] + [j for j in spec.boundaries() if j < spec.anchor.num_layers] + [spec.anchor.num_layers]
  return [(s, e) for s, e in zip(cuts[:-1], cuts[1:]) if e > s]


def cross_mask(q_ends, kv_ends, kv_valid):
  """[B, T, S]: anchor query t reads augmenting slot s iff s is valid and its character span ends at or
  before anchor token t's (`kv_ends[s] <= q_ends[t]`, end keys of calm/spans.py): causal in characters."""
  return (kv_ends[:, None, :] <= q_ends[:, :, None]) & kv_valid.astype(bool)[:, None, :]


def augment_state(spec: CompositionSpec, params, m: int, tokens, *, positions, valid, cache: dec.KVCache | None = None):
  """Runs augmenting model m; returns (its connected states [C, B, T, E_A] without gradient, its new KVCache or
  None)."""
  _, aux = dec.forward(spec.augments[m], params["augments"][m], tokens, positions=positions, valid=valid,
                       cache=cache, return_hidden=True)
  idx = np.asarray([i for i, _ in spec.connections[m]])
  return jax.lax.stop_gradient(aux["hidden"][idx]), aux["cache"]


def augment_states(spec: CompositionSpec, params, tokens, *, positions, valid, cache: CalmCache | None = None):
  """Runs every augmenting model on the anchor's tokens; returns (per model its connected states [C, B, T, E_A]
  without gradient, per model its new KVCache or None)."""
  out = [augment_state(spec, params, m, tokens, positions=positions, valid=valid,
                       cache=None if cache is None else cache.augments[m]) for m in range(len(spec.augments))]
  return [x[0] for x in out], [x[1] for x in out]


def forward(spec: CompositionSpec, params, tokens, *, valid=None, positions=None, aug_valid=None,
            cache: CalmCache | None = None, run_augments: bool = True, return_hidden: bool = False,
            streams: Sequence[AugStream | None] | None = None, ends=None):
  """Composed logits [B, T, V] (fp32) for tokens [B, T]; returns (logits, new cache or None), and with
  `return_hidden` also {anchor layer j: its composed output [B, T, E]} for every connected j.

  valid: [B, T] padding mask; aug_valid: which of these positions m_A's states may be read at
  (default valid; the encoder ablation masks the answer). With a cache, the T tokens go to
  slots cache.index..; run_augments=False leaves m_A out for these tokens (encoder decoding:
  their cross slots stay invalid).
  streams[m]: the own token stream (`AugStream`) of an augmenting model with `spec.own(m)`, read
  through `cross_mask` with `ends` [B, T], the anchor tokens' end keys; with a cache, its tokens
  are appended to that model's own slots.
  """
  a = spec.anchor
  b, t = tokens.shape
  valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
  aug_valid = valid if aug_valid is None else aug_valid.astype(bool) & valid
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  index = jnp.zeros((), jnp.int32) if cache is None else cache.index
  rope = cross_rope_tables(spec, positions)
  n_aug = len(spec.augments)
  streams = tuple(streams) if streams is not None else (None,) * n_aug
  if len(streams) != n_aug or any((x is not None) != spec.own(m) for m, x in enumerate(streams)):
    raise CompositionError(f"streams: give an AugStream exactly for the augmenting models with their own "
                           f"tokenizer {[spec.own(m) for m in range(n_aug)]}")
  if any(x is not None for x in streams) and ends is None:
    raise CompositionError("augmenting models with their own tokens need the anchor tokens' end keys (ends)")

  # Keys/values of every connection: fresh, or written into the cache and read back from it.
  cross_k, cross_v, aug_caches, masks, own = [], [], [None] * n_aug, [None] * n_aug, [None] * n_aug
  shared = [m for m in range(n_aug) if streams[m] is None]
  if cache is None:
    cross_valid = aug_valid
    for m in range(n_aug):
      x = streams[m]
      if x is None:
        s, _ = augment_state(spec, params, m, tokens, positions=positions, valid=valid)
      else:
        s, _ = augment_state(spec, params, m, x.tokens, positions=x.positions, valid=x.valid.astype(bool))
        masks[m] = cross_mask(ends, x.ends, x.valid)
      k, v = project_kv(params["compose"][m], s, a.rms_norm_eps, rope if x is None else None)
      cross_k.append(k)
      cross_v.append(v)
  else:
    new_cross = aug_valid if run_augments else jnp.zeros_like(aug_valid)
    cross_valid = jax.lax.dynamic_update_slice(cache.cross_valid, new_cross, (0, index))
    for m in range(n_aug):
      x, k, v = streams[m], cache.cross_k[m], cache.cross_v[m]
      if x is not None:  # its own slots, from its own index
        at = cache.augments[m].index
        s, aug_caches[m] = augment_state(spec, params, m, x.tokens, positions=x.positions,
                                         valid=x.valid.astype(bool), cache=cache.augments[m])
        kn, vn = project_kv(params["compose"][m], s, a.rms_norm_eps)
        ov = jax.lax.dynamic_update_slice(cache.own[m][0], x.valid.astype(bool), (0, at))
        oe = jax.lax.dynamic_update_slice(cache.own[m][1], x.ends.astype(jnp.int32), (0, at))
        own[m] = (ov, oe)
        masks[m] = cross_mask(ends, oe, ov)
      elif run_augments:
        s, aug_caches[m] = augment_state(spec, params, m, tokens, positions=positions, valid=valid,
                                         cache=cache.augments[m])
        kn, vn = project_kv(params["compose"][m], s, a.rms_norm_eps, rope)
        at = index
      else:
        aug_caches[m] = cache.augments[m]
      if x is not None or run_augments:
        k = jax.lax.dynamic_update_slice(k, kn.astype(k.dtype), (0, 0, at, 0, 0))
        v = jax.lax.dynamic_update_slice(v, vn.astype(v.dtype), (0, 0, at, 0, 0))
      cross_k.append(k)
      cross_v.append(v)

  kv_valid = valid if cache is None else jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
  if shared:
    q_slots = index + jnp.arange(t)
    shared_mask = attention_mask(q_slots, cross_valid)  # causal over slots: position t reads m_A <= t
    masks = [shared_mask if mk is None else mk for mk in masks]

  # The anchor: contiguous segments of its stack, cross-attention added after connected layers.
  at_layer = {j: [(m, c) for m, conns in enumerate(spec.connections) for c, (_, jj) in enumerate(conns) if jj == j]
              for j in spec.boundaries()}

  def compose_at(j, h):
    """h plus the updates of every connection into anchor layer j (each from the same state h)."""
    updates = [cross_attention(params["compose"][m], c, h, cross_k[m][c], cross_v[m][c], masks[m], a.rms_norm_eps,
                               rope if streams[m] is None else None) for m, c in at_layer.get(j, ())]
    if not updates:
      return h
    return h + sum(updates[1:], updates[0])

  hidden = {}
  h = compose_at(0, dec.embed(params["anchor"], tokens))  # anchor layer 0: the embedding output
  if 0 in at_layer:
    hidden[0] = h
  new_anchor = []
  for n, (s, e) in enumerate(_segments(spec)):
    layers = jax.tree.map(lambda x: x[s:e], params["anchor"]["layers"])
    seg_cache = None if cache is None else dec.KVCache(*cache.anchor[n], kv_valid, index)
    h, kv, _ = dec.run_layers(a, layers, h, positions=positions, kv_valid=kv_valid, cache=seg_cache,
                              layer_ids=np.arange(s, e))
    new_anchor.append(kv)
    h = compose_at(e, h)
    if at_layer.get(e):
      hidden[e] = h
  logits = dec.unembed(a, params["anchor"], h)
  new = None if cache is None else CalmCache(tuple(new_anchor), tuple(aug_caches), tuple(cross_k), tuple(cross_v),
                                             kv_valid, cross_valid, index + t, tuple(own))
  return (logits, new, hidden) if return_hidden else (logits, new)


def anchor_hidden(spec: CompositionSpec, anchor_params, tokens, *, valid=None) -> dict[int, jax.Array]:
  """The anchor alone: {j: its layer-j output [B, T, E]} at the layers the composition writes into."""
  a = spec.anchor
  b, t = tokens.shape
  valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  wanted = {j for conns in spec.connections for _, j in conns}
  h = dec.embed(anchor_params, tokens)
  out = {0: h} if 0 in wanted else {}
  for s, e in _segments(spec):
    layers = jax.tree.map(lambda x: x[s:e], anchor_params["layers"])
    h, _, _ = dec.run_layers(a, layers, h, positions=positions, kv_valid=valid, cache=None, layer_ids=np.arange(s, e))
    if e in wanted:
      out[e] = h
  return out


def prompt_mask(valid, prompt_len):
  """[B, T] positions of the prompt (the encoder ablation lets m_A read only these)."""
  return valid.astype(bool) & (jnp.arange(valid.shape[1])[None] < prompt_len[:, None])


@functools.partial(jax.jit, static_argnames=("spec",))
def _apply(spec, params, tokens, valid, aug_valid):
  return forward(spec, params, tokens, valid=valid, aug_valid=aug_valid)[0]


@functools.partial(jax.jit, static_argnames=("spec",))
def _apply_streams(spec, params, tokens, valid, streams, ends):
  return forward(spec, params, tokens, valid=valid, streams=streams, ends=ends)[0]


class _Holder(nnx.Module):
  """Holder of one augmenting model's composition parameters."""


class Composed(nnx.Module):
  """A frozen anchor, frozen augmenting models (`Decoder`s, `nnx.Param`) and the composition
  parameters (`ComposeParam`): the only thing the trainer updates with `trainable=ComposeParam`."""

  def __init__(self, anchor: dec.Decoder, augments: Sequence[dec.Decoder], *, augment_layers=None,
               anchor_layers=None, num_heads: int | None = None, aug_mode: str = "iterative", seed: int = 0,
               compose_params=None, zero_output: bool = True, cross_rope: bool = False, cross_null: bool = False,
               own_tokens=None):
    self.spec = CompositionSpec.make(anchor.config, [m.config for m in augments], augment_layers=augment_layers,
                                     anchor_layers=anchor_layers, num_heads=num_heads, aug_mode=aug_mode,
                                     cross_rope=cross_rope, cross_null=cross_null, own_tokens=own_tokens)
    self.anchor = anchor
    self.num_augments = len(augments)
    for m, model in enumerate(augments):
      setattr(self, f"augment{m}", model)
    if compose_params is None:
      compose_params = init_compose_params(self.spec, seed, anchor.dtype, zero_output=zero_output)
    for m, (specs, values) in enumerate(zip(compose_param_specs(self.spec), compose_params)):
      holder = _Holder()
      for name, s in specs.items():
        value = jnp.asarray(values[name])
        if value.shape != s.shape:
          raise CompositionError(f"composition parameter {m}/{name}: shape {value.shape}, expected {s.shape}")
        setattr(holder, name, ComposeParam(value, axes=s.axes))
      setattr(self, f"compose{m}", holder)

  @property
  def augments(self) -> list[dec.Decoder]:
    return [getattr(self, f"augment{m}") for m in range(self.num_augments)]

  def compose_params(self) -> tuple[dict[str, Any], ...]:
    return tuple({name: getattr(getattr(self, f"compose{m}"), name)[...] for name in specs}
                 for m, specs in enumerate(compose_param_specs(self.spec)))

  def params(self) -> dict[str, Any]:
    """Everything as one plain pytree (what the pure kernels take)."""
    return {"anchor": self.anchor.params(), "augments": tuple(m.params() for m in self.augments),
            "compose": self.compose_params()}

  def __call__(self, tokens, valid=None, prompt_len=None, streams=None, ends=None):
    """Teacher-forced logits; with prompt_len and aug_mode "encoder", m_A reads only the prompt; `streams` and
    `ends` for augmenting models with their own tokenizer (`forward`)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if streams is not None:
      return _apply_streams(self.spec, self.params(), tokens, jnp.ones(tokens.shape, bool) if valid is None
                            else jnp.asarray(valid).astype(bool), tuple(streams), jnp.asarray(ends, jnp.int32))
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid).astype(bool)
    aug_valid = None
    if self.spec.aug_mode == "encoder":
      if prompt_len is None:
        raise ValueError("aug_mode 'encoder' needs prompt_len (the augmenting model reads only the prompt)")
      aug_valid = prompt_mask(valid, jnp.asarray(prompt_len))
    return _apply(self.spec, self.params(), tokens, valid, aug_valid)
