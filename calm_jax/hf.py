"""Hugging Face checkpoint directories <-> our decoder, without torch.

`load(path)` reads config.json and safetensors (single file or shards + index; fp32, bf16,
fp16) into a `Decoder`; `save(model, out_dir)` writes config.json, sharded safetensors and the
index into a temporary directory that is renamed into place. The HF <-> stacked-parameter
name mapping lives here and nowhere else.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.atomic import atomic_dir
from calm_jax.hub import model_dir
from calm_jax.models import ConfigError, Decoder, DecoderConfig, flatten, nest, param_specs
from calm_jax.safetensors_io import (AUX_FILES, CheckpointError, CheckpointReader, ShardedWriter, dtype_code,
                                    is_float_code)
IGNORED_HF = ("rotary_emb.inv_freq",)
DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_ATTN = "model.layers.{i}.self_attn.{p}_proj.{w}"
_MLP = "model.layers.{i}.mlp.{p}_proj.{w}"
# our stacked name -> (HF name template, per-layer?)
_HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers/attn_norm": "model.layers.{i}.input_layernorm.weight",
    "layers/mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers/{p}": _ATTN.format(i="{i}", p=p, w="weight") for p in "qkvo"},
    **{f"layers/{p}_bias": _ATTN.format(i="{i}", p=p, w="bias") for p in "qkvo"},
    **{f"layers/{p}": _MLP.format(i="{i}", p=p, w="weight") for p in ("gate", "up", "down")},
    **{f"layers/{p}_bias": _MLP.format(i="{i}", p=p, w="bias") for p in ("gate", "up", "down")},
}


def _to_ours(name: str, shape: tuple) -> Callable[[np.ndarray], np.ndarray]:
  """HF tensor (torch [out, in] layout) -> one layer's slice in our layout."""
  base = name.split("/")[-1]
  if base in ("q", "k", "v", "o", "gate", "up", "down", "lm_head"):
    return lambda w: w.T.reshape(shape)
  return lambda w: w.reshape(shape)


def _to_hf(name: str, hf_shape: tuple) -> Callable[[np.ndarray], np.ndarray]:
  base = name.split("/")[-1]
  if base in ("q", "k", "v", "o", "gate", "up", "down", "lm_head"):
    return lambda w: w.reshape(-1, hf_shape[0]).T if base != "o" else w.reshape(hf_shape[1], hf_shape[0]).T
  return lambda w: w.reshape(hf_shape)


def hf_tensor_names(cfg: DecoderConfig) -> dict[str, list[str]]:
  """Our stacked parameter name -> the HF tensor names it is built from (one per layer)."""
  out = {}
  for name in param_specs(cfg):
    tpl = _HF_NAMES[name]
    out[name] = [tpl.format(i=i) for i in range(cfg.num_layers)] if name.startswith("layers/") else [tpl]
  return out


def _hf_shape(cfg: DecoderConfig, name: str, spec_shape: tuple) -> tuple:
  per = spec_shape[1:] if name.startswith("layers/") else spec_shape
  base = name.split("/")[-1]
  if base in ("q", "k", "v"):
    return (per[1] * per[2], per[0])
  if base == "o":
    return (per[2], per[0] * per[1])
  if base in ("gate", "up", "down", "lm_head"):
    return (per[1], per[0])
  if base.endswith("_bias"):
    return (int(np.prod(per)),)
  return tuple(per)


def hf_shapes(cfg: DecoderConfig) -> dict[str, tuple]:
  """HF tensor name -> expected shape, for every tensor of a checkpoint of this config."""
  out = {}
  for name, spec in param_specs(cfg).items():
    for hf in hf_tensor_names(cfg)[name]:
      out[hf] = _hf_shape(cfg, name, spec.shape)
  return out


def _fail(path, problems: list[str]):
  shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
  raise CheckpointError(f"{path}: {shown}")


def load_config(path) -> DecoderConfig:
  cfg_path = model_dir(path) / "config.json"
  if not cfg_path.exists():
    raise CheckpointError(f"{path}: no config.json")
  return DecoderConfig.from_json_file(cfg_path)


def load_params(path, dtype: str | None = "float32", check_finite: bool = True) -> tuple[DecoderConfig, dict]:
  """(config, nested param dict of numpy arrays in our layout) from an HF directory (or a model name
  `calm_jax.hub.model_dir` resolves: a fetched model, a Hub id)."""
  path = model_dir(path)
  cfg = load_config(path)
  reader = CheckpointReader(path)
  expected = hf_shapes(cfg)
  problems = []
  for hf, shape in expected.items():
    if hf not in reader:
      problems.append(f"missing tensor {hf}")
    elif tuple(reader.shape(hf)) != shape:
      problems.append(f"tensor {hf} in {reader.location[hf]} has shape {tuple(reader.shape(hf))}, expected {shape}")
    elif not is_float_code(dtype_code(reader.dtype(hf))):
      problems.append(f"tensor {hf} in {reader.location[hf]} is {dtype_code(reader.dtype(hf))}, a weight must be "
                      "floating point")
  allowed = set(expected) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
  for hf in reader.keys():
    if hf not in allowed and not hf.endswith(IGNORED_HF):
      problems.append(f"unexpected tensor {hf} in {reader.location[hf]}")
  if problems:
    _fail(path, problems)
  target = DTYPE_NAMES[dtype] if dtype else None
  flat = {}
  for name, spec in param_specs(cfg).items():
    per_shape = spec.shape[1:] if name.startswith("layers/") else spec.shape
    conv = _to_ours(name, per_shape)
    parts = []
    for hf in hf_tensor_names(cfg)[name]:
      w = reader.get(hf)
      if check_finite and not np.isfinite(w.astype(np.float32)).all():
        _fail(path, [f"tensor {hf} in {reader.location[hf]} contains NaN or Inf"])
      parts.append(conv(w))
    arr = np.stack(parts) if name.startswith("layers/") else parts[0]
    flat[name] = arr.astype(target) if target is not None else np.array(arr)
  return cfg, nest(flat)


def load(path, dtype: str | None = "float32", check_finite: bool = True) -> Decoder:
  """Our NNX decoder from an HF directory or model name (dtype None keeps the checkpoint's)."""
  if dtype is not None and dtype not in DTYPE_NAMES:
    raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
  cfg, params = load_params(path, dtype, check_finite)
  return Decoder(cfg, params=jax.tree.map(jnp.asarray, params))


def save_params(cfg: DecoderConfig, params: dict, out_dir, *, max_shard_size="2GB", dtype: str | None = None,
                copy_from=None, overwrite: bool = False, extra_files: dict[str, Any] | None = None,
                tokenizer=None) -> Path:
  """Writes an HF directory (config.json, safetensors shards + index) atomically: the tokenizer and
  extra files ({name: text or JSON-able}) land in it before it is renamed into place."""
  if dtype is not None and dtype not in DTYPE_NAMES:
    raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
  flat = flatten(jax.device_get(params))
  specs = param_specs(cfg)
  target = np.dtype(DTYPE_NAMES[dtype]) if dtype else None
  items = []  # (hf name, shape, dtype, thunk)
  for name, spec in specs.items():
    arr = flat[name]
    dt = target if target is not None else np.asarray(arr).dtype
    hf_names = hf_tensor_names(cfg)[name]
    hf_shape = _hf_shape(cfg, name, spec.shape)
    conv = _to_hf(name, hf_shape)
    for i, hf in enumerate(hf_names):
      sl = (lambda a=arr, i=i: np.asarray(a[i])) if name.startswith("layers/") else (lambda a=arr: np.asarray(a))
      items.append((hf, hf_shape, dt, lambda sl=sl, conv=conv, dt=dt: np.ascontiguousarray(conv(sl())).astype(dt)))
  items.sort(key=lambda x: _hf_order(x[0]))
  hf_cfg = cfg.to_hf()
  hf_cfg["dtype"] = str(np.dtype(items[0][2])) if target is None else dtype
  hf_cfg.pop("torch_dtype", None)
  with atomic_dir(out_dir, overwrite=overwrite, inputs=[copy_from]) as tmp:
    if copy_from is not None:
      for f in AUX_FILES:
        src = Path(copy_from) / f
        if src.exists():
          shutil.copy2(src, tmp / f)
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if not (tmp / "generation_config.json").exists():
      gen = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
             "eos_token_id": hf_cfg.get("eos_token_id")}
      (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
    for fname, content in (extra_files or {}).items():
      (tmp / fname).write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    if tokenizer is not None:
      tokenizer.save(tmp)
    with ShardedWriter(tmp, [(n, s, d) for n, s, d, _ in items], max_shard_size) as w:
      for n, _, _, thunk in items:
        w.write(n, thunk())
  return Path(out_dir)


def _hf_order(name: str):
  parts = name.split(".")
  if len(parts) > 2 and parts[1] == "layers":
    return (1, int(parts[2]), name)
  return (0 if "embed" in name else 2, 0, name)


def save(model: Decoder, out_dir, *, max_shard_size="2GB", dtype: str | None = None, copy_from=None,
         overwrite: bool = False, tokenizer=None, extra_files: dict[str, Any] | None = None) -> Path:
  """Writes `model` (and `tokenizer`, `extra_files`) as an HF directory loadable by `load` and by
  transformers; `copy_from`: an HF directory whose tokenizer and generation files come along."""
  return save_params(model.config, model.params(), out_dir, max_shard_size=max_shard_size, dtype=dtype,
                     copy_from=copy_from, overwrite=overwrite, tokenizer=tokenizer, extra_files=extra_files)
