"""LoRA as a transform over the decoder: factors beside a frozen base, applied through `Hooks`.

    W x  ->  W x + (alpha / r) · B(A(dropout(x)))        (Hu et al. 2021, eq. 3; B = 0 at init)

Interface (everything a method needs; parameters are plain nested dicts at the jit boundary):

  spec = LoRASpec.create(cfg, targets="layers/(q|v)", rank=8, alpha=16, dropout=0.0, num_experts=None)
      `targets` is a regex fully matched against the stacked projection names "layers/q", "layers/k",
      "layers/v", "layers/o", "layers/gate", "layers/up", "layers/down"; a regex matching none is an
      error naming it and the candidates. scale = alpha / rank.
  lora = init_lora(cfg, spec, seed)        {name: {"a": [L, (X,) *in, r], "b": [L, (X,) r, *out]}}, b = 0
  lora_specs(cfg, spec)                    "name/a" -> ParamSpec with logical axes
                                           ("layers", ["experts"], *in axes, "lora_rank") etc.
  logits, aux = forward(cfg, params, tokens, hooks=spec.hooks(), extra=lora_extra(lora, ...))
      lora_extra(lora, experts=[B] int | [L, B] int, weights=[B, X] | [L, B, X], rng=key)
      with an expert axis X each example uses its own expert (gather, BGMV-style) or a mixture
      Σ_x w_bx · B_x A_x x of the experts' outputs (einsum); per-layer routing is [L, B, ...].
      `LoRAHooks.begin_layer` may return the routing instead (routers, moa/): ctx wins over extra.
  lora_delta(x, a, b, scale, route)        the same delta for one layer, for methods with own hooks
  merge_lora(cfg, params, lora, scale)     W + scale · A B (fp32, cast back), one adapter (or expert=i)
  LoRAModel(base: Decoder, spec, seed)     NNX: frozen base nnx.Param + LoRAParam factors;
                                           __call__(input_ids, attention_mask, experts=, weights=, rng=)
                                           -> logits; train with calm_jax.train.train(trainable=LoRAParam)
  save_adapter(dir, lora, spec, base_params) / load_adapter(dir, base_params=, rank=)
      adapter.safetensors + adapter_config.json (base fingerprint, targets, rank, alpha, experts);
      loading for another base or with another rank than asked is an AdapterError naming both.
  count_params(lora)

Dropout acts on the LoRA input only and only when an rng is given (training); evaluation
passes none, so it is off.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm_jax import hf
from calm_jax.atomic import atomic_dir
from calm_jax.errors import UserError
from calm_jax.fingerprint import fingerprint
from calm_jax.models.config import DecoderConfig
from calm_jax.models.decoder import DENSE_EQ, Decoder, Hooks, ParamSpec, flatten, forward, nest, param_specs
from calm_jax.safetensors_io import SafetensorsFile
from calm_jax.variables import LoRAParam

TARGETABLE = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(UserError):
  """An adapter that does not fit: another base, another rank, missing or extra factors."""


def _num_in(name: str) -> int:
  """How many leading (after the layer axis) weight dims contract with the input."""
  return 2 if name == "o" else 1


def select_targets(cfg: DecoderConfig, regex: str) -> tuple[str, ...]:
  """Short names ("q", ...) of the projections whose "layers/NAME" fully matches `regex`."""
  candidates = [f"layers/{n}" for n in TARGETABLE]
  try:
    pat = re.compile(regex)
  except re.error as e:
    raise ValueError(f"LoRA targets regex {regex!r} is invalid: {e}") from None
  hit = tuple(c.split("/")[1] for c in candidates if pat.fullmatch(c))
  if not hit:
    raise ValueError(f"LoRA targets regex {regex!r} matches no parameter; candidates: {', '.join(candidates)}")
  return hit


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """What a LoRA adapts and how: static (hashable), so it can parametrise jitted functions."""
  targets: tuple[str, ...]
  rank: int
  alpha: float
  dropout: float = 0.0
  num_experts: int | None = None

  @classmethod
  def create(cls, cfg: DecoderConfig, targets: str = "layers/(q|k|v|o|gate|up|down)", rank: int = 8,
             alpha: float | None = None, dropout: float = 0.0, num_experts: int | None = None) -> "LoRASpec":
    if int(rank) < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= float(dropout) < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if num_experts is not None and int(num_experts) < 1:
      raise ValueError(f"num_experts must be >= 1 or None, got {num_experts}")
    return cls(select_targets(cfg, targets), int(rank), float(rank if alpha is None else alpha), float(dropout),
               None if num_experts is None else int(num_experts))

  @classmethod
  def from_config(cls, cfg: DecoderConfig, c, num_experts: int | None = None) -> "LoRASpec":
    """From a config block with targets, rank, alpha, dropout."""
    return cls.create(cfg, c.targets, int(c.rank), float(c.alpha), float(c.dropout), num_experts)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def hooks(self) -> "LoRAHooks":
    return LoRAHooks(self.targets, self.scale, self.dropout)

  def with_experts(self, num_experts: int | None) -> "LoRASpec":
    return dataclasses.replace(self, num_experts=num_experts)


def lora_specs(cfg: DecoderConfig, spec: LoRASpec) -> dict[str, ParamSpec]:
  """Flat "name/a", "name/b" -> ParamSpec (shape + logical axes) of the factors."""
  base = param_specs(cfg)
  out = {}
  for name in spec.targets:
    ws = base[f"layers/{name}"]
    n = _num_in(name)
    in_shape, out_shape = ws.shape[1:1 + n], ws.shape[1 + n:]
    in_axes, out_axes = ws.axes[1:1 + n], ws.axes[1 + n:]
    ex_shape, ex_axes = ((spec.num_experts,), ("experts",)) if spec.num_experts else ((), ())
    L = cfg.num_layers
    out[f"{name}/a"] = ParamSpec((L, *ex_shape, *in_shape, spec.rank), ("layers", *ex_axes, *in_axes, "lora_rank"),
                                 "lora_a")
    out[f"{name}/b"] = ParamSpec((L, *ex_shape, spec.rank, *out_shape), ("layers", *ex_axes, "lora_rank", *out_axes),
                                 "zeros")
  return out


def init_lora(cfg: DecoderConfig, spec: LoRASpec, seed: int = 0, dtype=jnp.float32) -> dict[str, Any]:
  """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming-uniform(a=sqrt 5)), B = 0: starts equal to the base."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, ps in sorted(lora_specs(cfg, spec).items()):
    if ps.init == "lora_a":
      fan_in = math.prod(ps.shape[-1 - _num_in(name.split("/")[0]):-1])
      bound = 1.0 / math.sqrt(fan_in)
      flat[name] = jnp.asarray(rng.uniform(-bound, bound, ps.shape).astype(np.float32), dtype)
    else:
      flat[name] = jnp.zeros(ps.shape, dtype)
  return nest(flat)


def count_params(lora) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(lora)))


def lora_delta(x, a, b, scale: float, route=None):
  """scale · (x A) B for one layer.

  x [B, T, *in]; a [(X,) *in, r]; b [(X,) r, *out]. route: None (no expert axis), int [B]
  (each example its expert: gathered factors) or float [B, X] (mixture of the experts' outputs).
  """
  has_experts = route is not None
  n_in = x.ndim - 2
  lead = 1 if has_experts else 0
  out_dims = b.shape[lead + 1:]
  bsz, t = x.shape[:2]
  I = math.prod(x.shape[2:])
  r = a.shape[-1]
  xf = x.reshape(bsz, t, I)
  af = a.reshape(*a.shape[:lead], I, r)
  bf = b.reshape(*b.shape[:lead], r, -1)
  if has_experts and a.ndim != n_in + 2:
    raise ValueError(f"a route was given but the LoRA factors have no expert axis (a {a.shape})")
  if not has_experts:
    if a.ndim != n_in + 1:
      raise ValueError(f"LoRA factors have an expert axis (a {a.shape}) but no expert index or weights were given")
    y = (xf @ af.astype(x.dtype)) @ bf.astype(x.dtype)
  elif jnp.issubdtype(route.dtype, jnp.integer):
    ag, bg = jnp.take(af, route, axis=0), jnp.take(bf, route, axis=0)  # [B, I, r], [B, r, O]
    h = jnp.einsum("bti,bir->btr", xf, ag.astype(x.dtype))
    y = jnp.einsum("btr,bro->bto", h, bg.astype(x.dtype))
  else:
    h = jnp.einsum("bti,xir->btxr", xf, af.astype(x.dtype)) * route.astype(x.dtype)[:, None, :, None]
    y = jnp.einsum("btxr,xro->bto", h, bf.astype(x.dtype))
  return (scale * y).reshape(bsz, t, *out_dims)


@dataclasses.dataclass(frozen=True)
class LoRAHooks(Hooks):
  """Adds the LoRA delta to each targeted projection.

  extra (scanned over layers): {"lora": factors, "route": [L, B] int | [L, B, X] float (optional),
  "rng": [L] keys (optional: dropout)}. A subclass's `begin_layer` may return {"route": ...}
  (e.g. computed by a router from the layer's input), which overrides extra["route"].
  """
  targets: tuple[str, ...]
  scale: float
  dropout: float = 0.0

  def route(self, extra, ctx):
    if isinstance(ctx, dict) and "route" in ctx:
      return ctx["route"]
    return extra.get("route")

  def dense(self, name, x, w, extra, ctx):
    y = jnp.einsum(DENSE_EQ[name], x, w)
    if name not in self.targets:
      return y
    f = extra["lora"][name]
    xin = x
    if self.dropout > 0 and extra.get("rng") is not None:
      key = jax.random.fold_in(extra["rng"], TARGETABLE.index(name))
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      xin = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    return y + lora_delta(xin, f["a"], f["b"], self.scale, self.route(extra, ctx)).astype(y.dtype)


def lora_extra(lora, num_layers: int | None = None, experts=None, weights=None, rng=None) -> dict[str, Any]:
  """The `extra` pytree for `forward`: per-example routing broadcast over layers, dropout keys.

  experts: int [B] (or [L, B] per layer); weights: float [B, X] (or [L, B, X]). At most one.
  """
  if experts is not None and weights is not None:
    raise ValueError("give experts (an index per example) or weights (a mixture per example), not both")
  L = num_layers if num_layers is not None else jax.tree.leaves(lora)[0].shape[0]
  out: dict[str, Any] = {"lora": lora}
  if experts is not None:
    e = jnp.asarray(experts, jnp.int32)
    out["route"] = jnp.broadcast_to(e, (L, *e.shape)) if e.ndim == 1 else e
  elif weights is not None:
    w = jnp.asarray(weights)
    out["route"] = jnp.broadcast_to(w, (L, *w.shape)) if w.ndim == 2 else w
  if rng is not None:
    out["rng"] = jax.random.split(rng, L)
  return out


def validate_experts(experts, num_experts: int, what: str = "expert index") -> np.ndarray:
  """experts as an int array in [0, num_experts), or a ValueError naming the offending entries."""
  e = np.asarray(experts)
  if e.dtype.kind not in "iu":
    raise ValueError(f"{what} must be integers, got dtype {e.dtype}")
  bad = np.flatnonzero((e < 0) | (e >= num_experts))
  if bad.size:
    raise ValueError(f"{what} out of range [0, {num_experts}): value {int(e.reshape(-1)[bad[0]])} at position "
                     f"{int(bad[0])} ({bad.size} bad entries)")
  return e.astype(np.int32)


def merge_lora(cfg: DecoderConfig, params, lora, scale: float, expert: int | None = None):
  """Base params with W + scale · A B folded into every adapted weight (fp32 sum, cast back once).

  With an expert axis, `expert` picks the adapter to merge.
  """
  layers = dict(params["layers"])
  for name, f in lora.items():
    if name not in TARGETABLE:
      raise AdapterError(f"unknown LoRA target {name!r}; targetable: {', '.join(TARGETABLE)}")
    w = layers[name]
    a, b = f["a"], f["b"]
    n_in = _num_in(name)
    has_x = a.ndim == n_in + 3  # [L, X, *in, r] vs [L, *in, r]
    if has_x:
      if expert is None:
        raise AdapterError(f"LoRA {name} has {a.shape[1]} experts: pass expert= to merge one of them")
      a, b = a[:, expert], b[:, expert]
    elif expert is not None:
      raise AdapterError("expert= given but the LoRA has no expert axis")
    L = w.shape[0]
    I = math.prod(w.shape[1:1 + n_in])
    delta = jnp.einsum("lir,lro->lio", a.reshape(L, I, -1).astype(jnp.float32),
                       b.reshape(L, b.shape[1], -1).astype(jnp.float32))
    layers[name] = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
  return {**params, "layers": layers}


def save_merged(cfg: DecoderConfig, params, lora, scale: float, out_dir, *, expert: int | None = None,
                copy_from=None, overwrite: bool = False, dtype: str | None = None) -> Path:
  """Merge one adapter into the base and write an HF checkpoint (loads in transformers)."""
  return hf.save_params(cfg, jax.device_get(merge_lora(cfg, params, lora, scale, expert)), out_dir,
                        copy_from=copy_from, overwrite=overwrite, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "hooks"))
def apply(cfg: DecoderConfig, hooks: Hooks, params, extra, tokens, valid):
  """Jitted logits of the base with LoRA hooks (for evaluation outside a training step)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return forward(cfg, params, tokens, valid=valid, positions=positions, hooks=hooks, extra=extra)[0]


class _Holder(nnx.Module):
  """Attribute holder (one per target) for the LoRA factors."""


def factor_module(cfg: DecoderConfig, spec: LoRASpec, lora) -> nnx.Module:
  """The factors as `LoRAParam`s with their logical axes (`.NAME.a`, `.NAME.b`); copies the arrays
  (the trainer donates the state it trains). Used by every module holding LoRA factors."""
  specs = lora_specs(cfg, spec)
  holder = _Holder()
  for name in spec.targets:
    h = _Holder()
    for part in ("a", "b"):
      setattr(h, part, LoRAParam(jnp.array(lora[name][part]), axes=specs[f"{name}/{part}"].axes))
    setattr(holder, name, h)
  return holder


def module_factors(holder: nnx.Module, spec: LoRASpec) -> dict[str, Any]:
  """The plain factor dict of a `factor_module`."""
  return {n: {p: getattr(getattr(holder, n), p)[...] for p in ("a", "b")} for n in spec.targets}


class LoRAModel(nnx.Module):
  """A frozen base (`nnx.Param`) plus `LoRAParam` factors; `__call__` gives logits for the trainer.

  Training: `calm_jax.train.train(model, trainable=LoRAParam, ...)` takes gradients and optimizer
  state for the factors only. The factors given are copied (the
  trainer donates the state it trains, which would otherwise delete the caller's arrays).
  """

  def __init__(self, base: Decoder, spec: LoRASpec, seed: int = 0, lora: dict | None = None):
    self.base = base
    self.spec = spec
    if lora is None:
      lora = init_lora(base.config, spec, seed, base.dtype)
    check_lora(base.config, spec, lora)
    self.lora = factor_module(base.config, spec, lora)

  @property
  def config(self) -> DecoderConfig:
    return self.base.config

  def factors(self) -> dict[str, Any]:
    return module_factors(self.lora, self.spec)

  def extra(self, experts=None, weights=None, rng=None):
    return lora_extra(self.factors(), self.config.num_layers, experts, weights, rng)

  def __call__(self, input_ids, attention_mask=None, experts=None, weights=None, rng=None):
    tokens = jnp.asarray(input_ids, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    if self.spec.num_experts and isinstance(experts, (np.ndarray, list, tuple)):  # host labels: check range
      validate_experts(experts, self.spec.num_experts)
    extra = self.extra(experts, weights, rng if self.spec.dropout > 0 else None)
    return apply(self.config, self.spec.hooks(), self.base.params(), extra, tokens, valid)

  def merged(self, expert: int | None = None) -> Decoder:
    """A plain Decoder with this adapter merged into its weights."""
    return Decoder(self.config, params=merge_lora(self.config, self.base.params(), self.factors(), self.spec.scale,
                                                  expert))


def check_lora(cfg: DecoderConfig, spec: LoRASpec, lora) -> None:
  """AdapterError listing missing / unexpected factors and wrong shapes."""
  want = lora_specs(cfg, spec)
  got = {k: np.shape(v) for k, v in flatten(lora).items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: shape {got[k]}, expected {want[k].shape}" for k in sorted(set(want) & set(got))
               if tuple(got[k]) != tuple(want[k].shape)]
  if problems:
    raise AdapterError(f"LoRA factors do not fit (targets {spec.targets}, rank {spec.rank}, "
                       f"experts {spec.num_experts}): " + "; ".join(problems))


def save_adapter(out_dir, lora, spec: LoRASpec, base_params, *, metadata: dict | None = None,
                 overwrite: bool = False) -> Path:
  """adapter.safetensors (factors, "q/a" ... names) + adapter_config.json, written atomically."""
  from safetensors.numpy import save_file

  flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in flatten(lora).items()}
  meta = {"base_fingerprint": fingerprint(base_params), "targets": list(spec.targets), "rank": spec.rank,
          "alpha": spec.alpha, "dropout": spec.dropout, "num_experts": spec.num_experts, **(metadata or {})}
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    save_file(flat, str(tmp / ADAPTER_WEIGHTS))
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
  return Path(out_dir)


def load_adapter(path, base_params=None, *, rank: int | None = None, cfg: DecoderConfig | None = None):
  """(factors, spec, metadata) of a saved adapter.

  base_params: refuse an adapter whose recorded base fingerprint differs. rank: refuse another rank.
  cfg: check the factor shapes against this decoder config.
  """
  path = Path(path)
  cfg_path = path / ADAPTER_CONFIG
  if not cfg_path.exists():
    raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (not an adapter directory)")
  try:
    meta = json.loads(cfg_path.read_text())
    if not isinstance(meta, dict) or not {"targets", "rank", "alpha"} <= set(meta):
      raise ValueError("needs an object with targets, rank and alpha")
  except (ValueError, UnicodeDecodeError) as e:
    raise AdapterError(f"{cfg_path}: corrupt adapter config ({e})") from None
  if base_params is not None:
    fp = fingerprint(base_params)
    if meta.get("base_fingerprint") != fp:
      raise AdapterError(f"{path}: adapter belongs to base {meta.get('base_fingerprint')}, "
                         f"this base is {fp}")
  if rank is not None and int(meta["rank"]) != int(rank):
    raise AdapterError(f"{path}: adapter has rank {meta['rank']}, expected rank {rank}")
  f = SafetensorsFile(path / ADAPTER_WEIGHTS)
  lora = nest({k: jnp.asarray(np.array(f.get(k))) for k in f.keys()})
  spec = LoRASpec(tuple(meta["targets"]), int(meta["rank"]), float(meta["alpha"]), float(meta.get("dropout", 0.0)),
                  meta.get("num_experts"))
  if cfg is not None:
    check_lora(cfg, spec, lora)
  return lora, spec, meta


def merge_adapter_dir(base, adapter, out_dir, *, expert: int | None = None, dtype: str | None = None) -> Path:
  """The HF directory `out_dir` = base model + one adapter folded into the weights (PEFT's
  `merge_and_unload`): `base` a model name or directory, `adapter` ours (adapter_config.json with a base
  fingerprint, checked) or a PEFT LoRA directory. Tokenizer and generation files come from the base;
  the output is written beside, never over, either input."""
  from calm_jax import hub
  from calm_jax.peft_format import is_peft_dir, load_peft

  base_dir = hub.model_dir(base)
  cfg, params = hf.load_params(base_dir)
  if is_peft_dir(adapter):
    factors, spec, _ = load_peft(adapter, cfg)
  else:
    factors, spec, _ = load_adapter(adapter, params, cfg=cfg)
  return save_merged(cfg, params, factors, spec.scale, out_dir, expert=expert, copy_from=base_dir, dtype=dtype)
