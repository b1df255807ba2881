"""The MoA model: frozen base (nnx.Param) + stacked LoRA experts (LoRAParam) + routers (RouterParam).

Training step (one compiled step over a mixed-domain batch):
    loss = LM(forward with each example's *labelled* expert) + γ · mean_l CE(p_l, domain)
where p_l is layer l's router distribution computed from the hidden states of that same forward
(`return_hidden`), pooled over the prompt tokens. Experts train or stay frozen by
the types passed to the trainer (`RouterParam`, with `LoRAParam` frozen or trained too).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm_jax.lora import LoRASpec, check_lora, factor_module, lora_extra, module_factors, validate_experts
from calm_jax.models.decoder import Decoder, forward
from calm_jax.train import lm_loss
from calm_jax.variables import RouterParam
from moa.routers import all_logits, init_routers, router_axes


def prompt_mask(batch):
  """[B, T] True on bos + prompt tokens (the router's pooling set)."""
  t = jnp.arange(batch["inputs"].shape[1])
  return t[None, :] < jnp.asarray(batch["prompt_len"])[:, None]


class MoAModel(nnx.Module):
  def __init__(self, base: Decoder, spec: LoRASpec, experts: dict, routers: dict | None = None, seed: int = 0):
    if not spec.num_experts:
      raise ValueError("MoAModel needs stacked experts (spec.num_experts)")
    check_lora(base.config, spec, experts)
    self.base = base
    self.spec = spec
    self.experts = factor_module(base.config, spec, experts)
    routers = routers if routers is not None else init_routers(base.config, spec.num_experts, seed, base.dtype)
    if routers["w"].shape != (base.config.num_layers, base.config.hidden_size, spec.num_experts):
      raise ValueError(f"routers of shape {routers['w'].shape} do not fit {spec.num_experts} experts")
    axes = router_axes()
    self.router_w = RouterParam(jnp.array(routers["w"]), axes=axes["w"])
    self.router_b = RouterParam(jnp.array(routers["b"]), axes=axes["b"])

  @property
  def config(self):
    return self.base.config

  def factors(self) -> dict:
    return module_factors(self.experts, self.spec)

  def routers(self) -> dict:
    return {"w": self.router_w[...], "b": self.router_b[...]}

  def labelled_forward(self, batch, rng=None):
    """(logits [B, T, V], router logits [L, B, X]) with each example on its labelled expert."""
    domain = batch["domain"]
    if isinstance(domain, np.ndarray):
      validate_experts(domain, self.spec.num_experts, "domain label")
    tokens = jnp.asarray(batch["inputs"], jnp.int32)
    valid = jnp.asarray(batch["attention_mask"]).astype(bool)
    extra = lora_extra(self.factors(), self.config.num_layers, experts=domain,
                       rng=rng if self.spec.dropout > 0 else None)
    logits, aux = forward(self.config, self.base.params(), tokens, valid=valid, hooks=self.spec.hooks(),
                          extra=extra, return_hidden=True)
    return logits, all_logits(self.routers(), aux["hidden"], prompt_mask(batch))


def moa_loss(gamma: float):
  """loss_fn(model, batch, rng) for calm_jax.train: LM loss + γ · router cross-entropy (mean over layers)."""

  def loss_fn(model: MoAModel, batch, rng):
    logits, rlogits = model.labelled_forward(batch, rng)
    lm, metrics = lm_loss(logits, batch["targets"], batch["loss_mask"])
    label = jnp.asarray(batch["domain"], jnp.int32)
    logp = jax.nn.log_softmax(rlogits, -1)
    ce = -jnp.take_along_axis(logp, label[None, :, None], -1).mean()
    acc = (jnp.argmax(rlogits, -1) == label[None]).mean()
    return lm + gamma * ce, {**metrics, "lm_loss": lm, "router_ce": ce, "router_accuracy": acc}

  return loss_fn


ROUTERS_FILE = "routers.safetensors"


def save_moa(out_dir, model: MoAModel, *, metadata: dict | None = None, overwrite: bool = False):
  """The trained MoA state on its own: stacked experts (as an adapter with num_experts) + routers."""
  from safetensors.numpy import save_file

  from calm_jax.atomic import atomic_dir
  from calm_jax.lora import save_adapter
  from pathlib import Path
  out = Path(out_dir)
  with atomic_dir(out, overwrite=overwrite) as tmp:
    save_adapter(tmp / "experts", model.factors(), model.spec, model.base.params(), metadata=metadata)
    save_file({k: np.asarray(v) for k, v in model.routers().items()}, str(tmp / ROUTERS_FILE))
  return out


def load_moa(path, base: Decoder) -> MoAModel:
  """A saved MoA state on `base` (refused if it was trained on another base)."""
  from pathlib import Path

  from calm_jax.lora import load_adapter
  from calm_jax.safetensors_io import SafetensorsFile
  experts, spec, _ = load_adapter(Path(path) / "experts", base.params(), cfg=base.config)
  f = SafetensorsFile(Path(path) / ROUTERS_FILE)
  return MoAModel(base, spec, experts, {k: jnp.asarray(np.array(f.get(k))) for k in ("w", "b")})
