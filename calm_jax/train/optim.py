"""optax chain from the config: schedule, global-norm clipping, (masked) weight decay."""
from __future__ import annotations

import re

import jax
import optax


def schedule(cfg, total_steps: int):
  """Learning-rate schedule: constant, cosine or linear decay after a linear warmup."""
  warm = int(cfg.get("warmup_steps", 0))
  lr = float(cfg.lr)
  kind = cfg.get("schedule", "constant")
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1), alpha=float(cfg.get("final_lr_fraction", 0.0)))
  elif kind == "linear":
    main = optax.linear_schedule(lr, lr * float(cfg.get("final_lr_fraction", 0.0)), max(total_steps - warm, 1))
  else:
    raise ValueError(f"unknown schedule {kind!r}: constant, cosine or linear")
  if warm:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
  return main


def path_mask(tree, exclude_regexes):
  """True for leaves whose '/'-joined path matches none of the regexes."""
  pats = [re.compile(r) for r in exclude_regexes]

  def name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

  return jax.tree_util.tree_map_with_path(lambda p, _: not any(r.fullmatch(name(p)) for r in pats), tree)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """cfg: name (adam|adamw|sgd), lr, schedule, warmup_steps, weight_decay, clip_norm, b1, b2, eps,
  no_decay (regexes of parameter paths without weight decay)."""
  sched = schedule(cfg, total_steps)
  name = cfg.get("name", "adamw")
  parts = []
  if cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  if name in ("adam", "adamw"):
    parts.append(optax.scale_by_adam(b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                                     eps=float(cfg.get("eps", 1e-8))))
    wd = float(cfg.get("weight_decay", 0.0)) if name == "adamw" else 0.0
    if wd:
      no_decay = list(cfg.get("no_decay", [".*norm.*", ".*bias.*"]))
      parts.append(optax.add_decayed_weights(wd, mask=lambda p: path_mask(p, no_decay)))
  elif name == "sgd":
    if cfg.get("momentum"):
      parts.append(optax.trace(decay=float(cfg.momentum)))
  else:
    raise ValueError(f"unknown optimizer {name!r}: adam, adamw or sgd")
  parts.append(optax.scale_by_learning_rate(sched))
  return optax.chain(*parts)
