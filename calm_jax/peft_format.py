"""LoRA adapters in PEFT's format, both ways: ours (and each MoA expert) out, any PEFT LoRA adapter in.

A PEFT LoRA directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules, ...)
and `adapter_model.safetensors` with, per adapted linear layer,

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]

and the update W x + (lora_alpha / r) · B A x (alpha / √r with use_rslora). Our factors are
a [L, (X,) *in, r], b [L, (X,) r, *out] in the decoder's layout, so lora_A[i] = a[i] flattened to
[in, r] and transposed, lora_B[i] = b[i] flattened to [r, out] and transposed; the input and output
orders are those of the HF weights (`calm_jax.hf`). `peft.PeftModel.from_pretrained` loads what
`save_peft` writes; `load_peft` reads what PEFT saves, refusing what our LoRA cannot express (DoRA,
per-module ranks or alphas, a subset of layers, trained biases or extra modules) by name.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import numpy as np

from calm_jax.atomic import atomic_dir
from calm_jax.lora import TARGETABLE, AdapterError, LoRASpec, _num_in, check_lora
from calm_jax.models.config import DecoderConfig
from calm_jax.models.decoder import param_specs
from calm_jax.safetensors_io import SafetensorsFile

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers"
_NAME = re.compile(rf"^{re.escape(_PREFIX)}\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def _tensor(i: int, name: str, ab: str) -> str:
  return f"{_PREFIX}.{i}.{HF_MODULES[name]}.lora_{ab}.weight"


def _shapes(cfg: DecoderConfig, name: str) -> tuple[tuple, tuple]:
  """(in shape, out shape) of projection `name` in our layout, per layer."""
  w = param_specs(cfg)[f"layers/{name}"].shape[1:]
  n = _num_in(name)
  return tuple(w[:n]), tuple(w[n:])


def save_peft(out_dir, lora, spec: LoRASpec, cfg: DecoderConfig, *, expert: int | None = None,
              base_model: str | None = None, overwrite: bool = False) -> Path:
  """Writes one adapter (or expert `expert` of a stack) as a PEFT LoRA directory, atomically."""
  from safetensors.numpy import save_file

  check_lora(cfg, spec, lora)
  if spec.num_experts and expert is None:
    raise AdapterError(f"the LoRA holds {spec.num_experts} experts: pass expert= to export one of them")
  if not spec.num_experts and expert is not None:
    raise AdapterError("expert= given but the LoRA has no expert axis")
  if expert is not None and not 0 <= int(expert) < spec.num_experts:
    raise AdapterError(f"expert {expert} out of range [0, {spec.num_experts})")
  tensors = {}
  for name in spec.targets:
    a, b = (np.asarray(jax.device_get(lora[name][k]), np.float32) for k in ("a", "b"))
    if expert is not None:
      a, b = a[:, expert], b[:, expert]
    for i in range(cfg.num_layers):
      tensors[_tensor(i, name, "A")] = np.ascontiguousarray(a[i].reshape(-1, spec.rank).T)
      tensors[_tensor(i, name, "B")] = np.ascontiguousarray(b[i].reshape(spec.rank, -1).T)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "target_modules": sorted(HF_MODULES[n].split(".")[1] for n in spec.targets),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model}
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
  return Path(out_dir)


def is_peft_dir(path) -> bool:
  return (Path(path) / PEFT_WEIGHTS).exists() and (Path(path) / PEFT_CONFIG).exists()


def load_peft(path, cfg: DecoderConfig) -> tuple[dict, LoRASpec, dict]:
  """(factors, spec, PEFT config) of a PEFT LoRA directory for a base of config `cfg`."""
  path = Path(path)
  cfg_path = path / PEFT_CONFIG
  if not is_peft_dir(path):
    raise AdapterError(f"{path}: not a PEFT adapter directory (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
  try:
    pc = json.loads(cfg_path.read_text())
    if not isinstance(pc, dict):
      raise ValueError("not a JSON object")
  except (ValueError, UnicodeDecodeError) as e:
    raise AdapterError(f"{cfg_path}: corrupt adapter config ({e})") from None
  problems = []
  if pc.get("peft_type", "LORA") != "LORA":
    problems.append(f"peft_type {pc.get('peft_type')!r} (only LORA)")
  for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights")):
    if pc.get(key):
      problems.append(f"{key}=true ({what} is not supported)")
  for key in ("rank_pattern", "alpha_pattern"):
    if pc.get(key):
      problems.append(f"{key} {pc[key]} (one rank and alpha for every module only)")
  for key in ("layers_to_transform", "modules_to_save"):
    if pc.get(key):
      problems.append(f"{key} {pc[key]} (every layer, LoRA factors only)")
  if pc.get("bias", "none") != "none":
    problems.append(f"bias {pc['bias']!r} (only 'none')")
  if problems:
    raise AdapterError(f"{cfg_path}: " + "; ".join(problems))
  try:
    rank, alpha = int(pc["r"]), float(pc["lora_alpha"])
  except (KeyError, TypeError, ValueError) as e:
    raise AdapterError(f"{cfg_path}: needs integer r and numeric lora_alpha ({e})") from None
  if pc.get("use_rslora"):
    alpha *= math.sqrt(rank)  # PEFT scales by alpha / sqrt(r); ours by alpha / r
  f = SafetensorsFile(path / PEFT_WEIGHTS)
  short = {v.split(".")[1]: k for k, v in HF_MODULES.items()}
  found: dict[str, dict[int, dict[str, str]]] = {}
  for key in f.keys():
    m = _NAME.match(key)
    if not m or m.group(3) not in short or int(m.group(1)) >= cfg.num_layers:
      raise AdapterError(f"{path / PEFT_WEIGHTS}: unexpected tensor {key} for a {cfg.num_layers}-layer "
                         f"{cfg.model_type} base")
    found.setdefault(short[m.group(3)], {}).setdefault(int(m.group(1)), {})[m.group(4)] = key
  if not found:
    raise AdapterError(f"{path / PEFT_WEIGHTS}: no LoRA tensors")
  targets = tuple(n for n in TARGETABLE if n in found)
  lora = {}
  for name in targets:
    in_shape, out_shape = _shapes(cfg, name)
    a, b = [], []
    for i in range(cfg.num_layers):
      pair = found[name].get(i, {})
      if set(pair) != {"A", "B"}:
        raise AdapterError(f"{path / PEFT_WEIGHTS}: layer {i} {HF_MODULES[name]} has no lora_"
                           f"{'A' if 'A' not in pair else 'B'} (every layer of an adapted module is needed)")
      A, B = np.asarray(f.get(pair["A"]), np.float32), np.asarray(f.get(pair["B"]), np.float32)
      if A.shape != (rank, math.prod(in_shape)) or B.shape != (math.prod(out_shape), rank):
        raise AdapterError(f"{path / PEFT_WEIGHTS}: {pair['A']} {A.shape} / {pair['B']} {B.shape}, expected "
                           f"{(rank, math.prod(in_shape))} / {(math.prod(out_shape), rank)} for r={rank} on this base")
      a.append(A.T.reshape(*in_shape, rank))
      b.append(B.T.reshape(rank, *out_shape))
    lora[name] = {"a": np.stack(a), "b": np.stack(b)}
  spec = LoRASpec(targets, rank, alpha, float(pc.get("lora_dropout", 0.0) or 0.0), None)
  check_lora(cfg, spec, lora)
  return lora, spec, pc
