"""Stacked LoRA experts: domain adapters assembled into one [L, X, ...] factor tree.

The stacked tree is what `calm_jax.lora.LoRAHooks` applies per example (gather) or as a
mixture (einsum) in one compiled step. Stacking checks that every adapter belongs to the same
base and has the same targets and rank, so a stale or foreign adapter fails loudly here
instead of producing a silently wrong mixture.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from calm_jax.fingerprint import fingerprint
from calm_jax.lora import TARGETABLE, AdapterError, LoRASpec, load_adapter, lora_specs
from calm_jax.models.config import DecoderConfig


def stack_loras(loras: list[dict], specs: list[LoRASpec], names: list[str] | None = None):
  """(experts {name: {"a": [L, X, *in, r], "b": [L, X, r, *out]}}, spec with num_experts=X)."""
  if not loras:
    raise AdapterError("no adapters to stack")
  names = names or [f"adapter {i}" for i in range(len(loras))]
  first = specs[0]
  for name, spec in zip(names, specs):
    if spec.num_experts:
      raise AdapterError(f"{name} is already stacked ({spec.num_experts} experts); stack single adapters")
    if spec.rank != first.rank:
      raise AdapterError(f"cannot stack adapters of mismatched rank: {names[0]} has rank {first.rank}, "
                         f"{name} has rank {spec.rank}")
    if spec.targets != first.targets:
      raise AdapterError(f"cannot stack adapters with different targets: {names[0]} {first.targets}, "
                         f"{name} {spec.targets}")
    if spec.alpha != first.alpha:
      raise AdapterError(f"cannot stack adapters with different alpha (scale): {names[0]} {first.alpha}, "
                         f"{name} {spec.alpha}")
  experts = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *loras)
  return experts, first.with_experts(len(loras))


def load_experts(paths: list, base_params) -> tuple[dict, LoRASpec, list[dict]]:
  """Loads saved domain adapters (refusing any trained on another base) and stacks them."""
  fp = fingerprint(base_params)
  loras, specs, metas, names = [], [], [], []
  for p in paths:
    lora, spec, meta = load_adapter(p, None)
    if meta.get("base_fingerprint") != fp:
      raise AdapterError(f"{p}: adapter belongs to base {meta.get('base_fingerprint')}, the experts' base is {fp}")
    loras.append(lora)
    specs.append(spec)
    metas.append(meta)
    names.append(str(Path(p)))
  experts, spec = stack_loras(loras, specs, names)
  return experts, spec, metas


def add_expert(experts, spec: LoRASpec, lora, lora_spec: LoRASpec, name: str = "new adapter"):
  """The stack with one more expert appended (index X); the existing experts are copied unchanged."""
  if lora_spec.rank != spec.rank or lora_spec.targets != spec.targets or lora_spec.alpha != spec.alpha:
    raise AdapterError(f"cannot add {name} (targets {lora_spec.targets}, rank {lora_spec.rank}, alpha "
                       f"{lora_spec.alpha}) to experts with targets {spec.targets}, rank {spec.rank}, alpha {spec.alpha}")
  grown = jax.tree.map(lambda e, x: jnp.concatenate([e, x[:, None].astype(e.dtype)], axis=1), experts, lora)
  return grown, spec.with_experts(spec.num_experts + 1)


def harmonize(loras: list[dict], specs: list[LoRASpec], cfg: DecoderConfig) -> tuple[list[dict], LoRASpec]:
  """Adapters of any targets, ranks and alphas rewritten exactly as adapters of one spec (so they stack):
  the union of the targets (zero factors where an adapter has none), the largest rank (zero-padded A
  columns and B rows), and scale 1 (each B multiplied by its own alpha / r). Every adapter's update
  `scale · A B` is unchanged."""
  targets = tuple(n for n in TARGETABLE if any(n in s.targets for s in specs))
  rank = max(s.rank for s in specs)
  spec = LoRASpec(targets, rank, float(rank), 0.0, None)
  shapes = lora_specs(cfg, spec)
  out = []
  for lora, s in zip(loras, specs):
    if s.num_experts:
      raise AdapterError(f"cannot harmonize a stacked adapter ({s.num_experts} experts); give single adapters")
    one = {}
    for n in targets:
      a = jnp.zeros(shapes[f"{n}/a"].shape, jnp.float32)
      b = jnp.zeros(shapes[f"{n}/b"].shape, jnp.float32)
      if n in lora:
        a = a.at[..., :s.rank].set(jnp.asarray(lora[n]["a"], jnp.float32))
        b = b.at[:, :s.rank].set(jnp.asarray(lora[n]["b"], jnp.float32) * s.scale)
      one[n] = {"a": a, "b": b}
    out.append(one)
  return out, spec


def peft_experts(paths: list, cfg: DecoderConfig) -> tuple[dict, LoRASpec, list[dict]]:
  """PEFT LoRA adapters (any targets, ranks, alphas; e.g. the Hub's) as one expert stack, in order.
  A PEFT adapter records no fingerprint of its base: it is checked against `cfg`'s shapes only."""
  from calm_jax.peft_format import load_peft
  loras, specs, configs = [], [], []
  for p in paths:
    lora, spec, pc = load_peft(p, cfg)
    loras.append(lora)
    specs.append(spec)
    configs.append(pc)
  loras, spec = harmonize(loras, specs, cfg)
  experts, spec = stack_loras(loras, [spec] * len(loras), [str(p) for p in paths])
  return experts, spec, configs


def select_expert(experts, index: int):
  """One expert's factors as a single (unstacked) LoRA."""
  return jax.tree.map(lambda x: x[:, index], experts)
