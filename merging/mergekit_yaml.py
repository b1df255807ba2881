"""mergekit YAML configs as input: `python -m launch.merge --mergekit_yaml=FILE.yml --out=DIR`.

Supported: `merge_method` linear | task_arithmetic | ties | dare_ties | dare_linear, and
`metagpt` (our extension: per-model weights are computed, not given; optional top-level
`parameters.sparsify: ties | dare` with per-model `density`), with mergekit's semantics and
defaults (`convention="mergekit"`): per-tensor TIES trim, weights before the sign vote,
`normalize` default true for linear / ties, false otherwise, `rescale` (L1) default true for
DARE, `lambda` default 1, per-model `density` default 1. Keys: `base_model`, `models[].model`,
`models[].parameters.weight / density`, top-level `parameters.normalize / lambda / rescale /
int8_mask` (int8_mask only changes mergekit's mask storage: accepted, no effect here), `dtype`
/ `out_dtype` (the output dtype: our arithmetic is always fp32, mergekit computes in `dtype`).
Model paths are local directories. Anything else (slices, gradients, tokenizer, filters) is
refused with a clear error rather than silently ignored.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from merging.options import MergeError
from merging.stream import merge_checkpoints

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
PARAMS = {"normalize", "lambda", "rescale", "int8_mask", "sparsify"}
MODEL_PARAMS = {"weight", "density"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
METHODS = {"linear": "average", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare_ties": "dare_ties",
           "dare_linear": "dare", "metagpt": "metagpt"}
NORMALIZE_DEFAULT = {"linear": True, "ties": True}


def _scalar(where, value, kind):
  if isinstance(value, (list, dict)):
    raise MergeError(f"{where}: per-layer gradients / filtered values are not supported, give one {kind.__name__}")
  if kind is bool and not isinstance(value, bool):
    raise MergeError(f"{where}: expected true or false, got {value!r}")
  try:
    return kind(value)
  except (TypeError, ValueError):
    raise MergeError(f"{where}: expected a {kind.__name__}, got {value!r}") from None


def from_mergekit(cfg: dict, source: str = "config") -> tuple[str, list[str], str, dict]:
  """(base dir, model dirs, our method, our options) for a parsed mergekit config."""
  if not isinstance(cfg, dict):
    raise MergeError(f"{source}: not a YAML mapping")
  unknown = sorted(set(cfg) - TOP_KEYS)
  if unknown:
    raise MergeError(f"{source}: unsupported mergekit key(s) {', '.join(unknown)}; "
                     f"supported: {', '.join(sorted(TOP_KEYS))}")
  mk_method = cfg.get("merge_method")
  if mk_method not in METHODS:
    raise MergeError(f"{source}: merge_method {mk_method!r} is not supported; use one of {', '.join(METHODS)}")
  params = cfg.get("parameters") or {}
  bad = sorted(set(params) - PARAMS)
  if bad:
    raise MergeError(f"{source}: unsupported parameters {', '.join(bad)}")
  entries = cfg.get("models") or []
  if not entries:
    raise MergeError(f"{source}: no models")
  base = cfg.get("base_model")
  if base is None and mk_method != "linear":
    raise MergeError(f"{source}: merge_method {mk_method} needs base_model")
  models, weights, density = [], [], []
  for i, e in enumerate(entries):
    if not isinstance(e, dict) or "model" not in e:
      raise MergeError(f"{source}: models[{i}] needs a `model:` path")
    p = e.get("parameters") or {}
    bad = sorted(set(p) - MODEL_PARAMS) + sorted(set(e) - {"model", "parameters"})
    if bad:
      raise MergeError(f"{source}: models[{i}]: unsupported key(s) {', '.join(bad)}")
    if mk_method != "linear" and base is not None and str(e["model"]) == str(base):
      continue  # mergekit lists the base among the models; task-vector methods skip it
    models.append(str(e["model"]))
    if mk_method == "metagpt" and "weight" in p:
      raise MergeError(f"{source}: models[{i}]: metagpt computes the weights; remove `weight`")
    if mk_method != "metagpt" and "weight" not in p:
      raise MergeError(f"{source}: models[{i}] ({e['model']}): mergekit requires parameters.weight")
    weights.append(_scalar(f"models[{i}].weight", p.get("weight", 1.0), float))
    density.append(_scalar(f"models[{i}].density", p.get("density", 1.0), float))
  opts: dict = {"convention": "mergekit"}
  method = METHODS[mk_method]
  normalize = _scalar("parameters.normalize", params.get("normalize", NORMALIZE_DEFAULT.get(mk_method, False)), bool)
  if mk_method == "linear":
    if not normalize:
      raise MergeError(f"{source}: linear with normalize: false (an unnormalized sum of models) is not supported")
    opts["weights"] = weights
  else:
    opts["lam"] = _scalar("parameters.lambda", params.get("lambda", 1.0), float)
    opts["normalize"] = "weight" if normalize else "none"
    if mk_method != "metagpt":
      opts["weights"] = weights
  if mk_method in ("ties",):
    opts["density"] = density
  if mk_method in ("dare_ties", "dare_linear"):
    opts["drop_rate"] = [1 - d for d in density]
    opts["rescale"] = "l1" if _scalar("parameters.rescale", params.get("rescale", True), bool) else "none"
  if mk_method == "metagpt":
    sparsify = params.get("sparsify", "none")
    opts["sparsify"] = sparsify
    if sparsify == "ties":
      opts["density"] = density
    elif sparsify == "dare":
      opts["drop_rate"] = [1 - d for d in density]
  dtype = cfg.get("out_dtype", cfg.get("dtype"))
  if dtype is not None:
    if dtype not in DTYPES:
      raise MergeError(f"{source}: dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    opts["out_dtype"] = DTYPES[dtype]
  return str(base if base is not None else models[0]), models, method, opts


def run_mergekit_yaml(path, out, *, overwrite: bool = False, seed: int = 0, progress: bool = True,
                      max_shard_size="2GB") -> Path:
  path = Path(path)
  try:
    cfg = yaml.safe_load(path.read_text())
  except (OSError, yaml.YAMLError) as e:
    raise MergeError(f"{path}: cannot read the mergekit config ({e})") from None
  base, models, method, opts = from_mergekit(cfg, str(path))
  if method in ("dare", "dare_ties") or opts.get("sparsify") == "dare":
    opts["seed"] = seed
  return merge_checkpoints(base, models, out, method, overwrite=overwrite, progress=progress,
                           max_shard_size=max_shard_size, **opts)
