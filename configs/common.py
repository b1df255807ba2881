"""Helpers shared by every config file: `parse_arg` for `file.py:variant=x,flag` arguments,
and the common defaults (mesh, logical rules, checkpointing, logging)."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses `"a=1,flag,b=x"` into a ConfigDict typed like the defaults in `spec`.

  A bare name sets a bool to True; a bare value goes to the first key of spec. Unknown keys
  raise (unless lazy) so a typo in a variant name fails.
  """
  out = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return out
  first = next(iter(spec), None)
  for i, part in enumerate(p for p in arg.split(",") if p):
    if "=" in part:
      key, value = part.split("=", 1)
    elif part in spec and isinstance(spec[part], bool):
      key, value = part, "True"
    elif i == 0 and first is not None:
      key, value = first, part
    else:
      key, value = part, "True"
    if key not in spec:
      if lazy:
        out[key] = value
        continue
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(spec)}")
    default = spec[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a bool")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def add_common(c: ml_collections.ConfigDict, *, steps: int, batch_size: int) -> ml_collections.ConfigDict:
  """Training defaults every training config shares; files override what they need."""
  c.seed = 0
  c.steps = steps
  c.batch_size = batch_size
  c.frozen = []  # regexes of parameter paths kept frozen although their type trains (the method names the type)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, schedule="cosine", warmup_steps=0, final_lr_fraction=0.0,
      weight_decay=0.0, no_decay=[".*norm.*", ".*bias.*"], clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8,
      momentum=0.0))
  # (mesh axis, size): sizes are fixed, -1 takes the remaining devices, and what a batch cannot use is
  # replicated (calm_jax.sharding.mesh_shape): any device count runs.
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.rules = []  # [(logical axis, mesh axis or None)] overriding calm_jax.sharding.DEFAULT_RULES
  c.log_every = 50
  c.eval_every = 0
  c.tensorboard = True
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2))
  # True: resume a checkpoint although the config differs from the one it was made with (the
  # changes are recorded in checkpoints/meta.json); False: such a resume is refused, naming them.
  c.resume_with_changes = False
  return c


def data_files() -> dict:
  """The `data` keys every method shares for users' dataset files (`calm_jax.data.load_dataset_config`):
  train (a file or Hub dataset; empty = the synthetic suite), val / test, or val_fraction of train,
  the record format, field names, the chat template switch and the longest row in tokens."""
  return dict(train="", val="", test="", val_fraction=0.0, seed=0, format="auto", chat_template="auto",
              max_len=256, fields=dict(prompt="prompt", answer="answer", messages="messages", domain="domain",
                                       choices="choices"))
