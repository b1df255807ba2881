"""optax chain from the config: schedule, global-norm clipping, (masked) weight decay."""
from __future__ import annotations

import re

import jax
import optax


def schedule(cfg, total_steps: int):
  """Learning-rate schedule: constant, cosine or linear decay after a linear warmup."""
  warm = int(cfg.warmup_steps)
  lr = float(cfg.lr)
  kind = cfg.schedule
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warm, 1), alpha=float(cfg.final_lr_fraction))
  elif kind == "linear":
    main = optax.linear_schedule(lr, lr * float(cfg.final_lr_fraction), max(total_steps - warm, 1))
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
  """cfg (configs/common.py's optimizer block): name (adam|adamw|sgd), lr, schedule, warmup_steps,
  final_lr_fraction, weight_decay, no_decay (regexes of parameter paths without weight decay),
  clip_norm (0: none), b1, b2, eps, momentum (sgd)."""
  sched = schedule(cfg, total_steps)
  name = cfg.name
  parts = []
  if cfg.clip_norm:
    parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  if name in ("adam", "adamw"):
    parts.append(optax.scale_by_adam(b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)))
    wd = float(cfg.weight_decay) if name == "adamw" else 0.0
    if wd:
      no_decay = list(cfg.no_decay)
      parts.append(optax.add_decayed_weights(wd, mask=lambda p: path_mask(p, no_decay)))
  elif name == "sgd":
    if cfg.momentum:
      parts.append(optax.trace(decay=float(cfg.momentum)))
  else:
    raise ValueError(f"unknown optimizer {name!r}: adam, adamw or sgd")
  parts.append(optax.scale_by_learning_rate(sched))
  return optax.chain(*parts)
