"""Config (configs/merge/*.py) -> `merge_checkpoints` call: what `launch/merge.py` runs."""
from __future__ import annotations

from pathlib import Path

from merging.options import MergeError, option_names
from merging.stream import CHUNK, merge_checkpoints

_UNSET_IF_EMPTY = ("sparsify", "trim", "vote", "normalize", "rescale", "out_dtype", "include", "exclude")


def _list(value: str, what: str, cast=str) -> list:
  try:
    return [cast(v.strip()) for v in str(value).split(",") if v.strip()]
  except ValueError:
    raise MergeError(f"config.{what}={value!r}: expected comma-separated numbers") from None


def options_from_config(c) -> dict:
  """The merge options a config sets ("" means: the method's default)."""
  opts = {k: c[k] for k in option_names() if k in c}
  for k in _UNSET_IF_EMPTY:
    if opts.get(k) == "":
      opts[k] = None
  if "weights" in opts:
    opts["weights"] = _list(opts["weights"], "weights", float) or None
  return opts


def run_config(c) -> Path:
  missing = [k for k in ("base", "models", "out") if not c[k]]
  if missing:
    raise MergeError(f"set {', '.join('--config.' + k for k in missing)}")
  return merge_checkpoints(c.base, _list(c.models, "models"), c.out, c.method, overwrite=c.overwrite,
                           max_shard_size=c.max_shard_size, progress=c.progress, mesh=c.mesh or None,
                           low_memory=c.low_memory, chunk=CHUNK if c.chunk is None else c.chunk or None,
                           **options_from_config(c))
