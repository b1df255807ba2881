"""Decoder configuration, read from and written back to a Hugging Face `config.json`.

One config covers the llama / mistral / qwen2 family: RMSNorm, RoPE (default, linear,
llama3 scaling), grouped-query attention, SwiGLU MLP, optional q/k/v (and o) biases,
optional sliding-window attention, tied or untied embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from calm_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(UserError):
  """A config.json this decoder family cannot represent."""


def _positive_int(d: dict, key: str) -> int:
  """d[key] as an int >= 1, or a ConfigError naming the key and the value (not a ZeroDivisionError later)."""
  v = d[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
    raise ConfigError(f"{key}={v!r}: expected a positive integer")
  return int(v)


def _positive_float(d: dict, key: str) -> float:
  v = d[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
    raise ConfigError(f"{key}={v!r}: expected a positive number")
  return float(v)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Static (hashable) description of a decoder; `hf` keeps the original dict for saving."""
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  # Sliding window per layer (0 = full attention); a tuple so the config stays hashable.
  layer_windows: tuple[int, ...] = ()
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  hf: tuple[tuple[str, str], ...] = ()  # original config.json items (JSON-encoded values)

  def __post_init__(self):
    if not self.layer_windows:
      object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
    if len(self.layer_windows) != self.num_layers:
      raise ConfigError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")

  @property
  def has_sliding_window(self) -> bool:
    return any(self.layer_windows)

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> "DecoderConfig":
    """Builds the config from a parsed HF config.json dict; unsupported features raise."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(f"unknown model_type {mt!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    req = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [k for k in req if d.get(k) is None]
    if missing:
      raise ConfigError(f"config.json lacks {', '.join(missing)}")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      _positive_int(d, k)
    for k in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
      if d.get(k) is not None:
        _positive_int(d, k)
    for k in ("rms_norm_eps", "rope_theta"):
      if d.get(k) is not None:
        _positive_float(d, k)
    n_layers = d["num_hidden_layers"]
    n_heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
    if not head_dim:
      raise ConfigError(f"hidden_size={d['hidden_size']} is smaller than num_attention_heads={n_heads}: no head_dim")

    rope = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    for k, v in legacy.items():
      rope.setdefault(k, v)
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope["type"]
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(f"rope_type {rope_type!r} is not supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError("partial_rotary_factor != 1 is not supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))

    # Sliding windows as transformers' modeling code applies them (defaults are its config defaults):
    # mistral windows every layer and ignores layer_types; qwen2 windows the layers that layer_types
    # (or, without it, max_window_layers) marks, and only with use_sliding_window; llama never.
    windows = (0,) * n_layers
    if mt == "mistral":
      window = d.get("sliding_window", 4096)
      windows = (int(window or 0),) * n_layers
    elif mt == "qwen2":
      window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
      layer_types = d.get("layer_types")
      if layer_types is None:
        mwl = d.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if window is not None and i >= mwl else "full_attention"
                       for i in range(n_layers)]
      if len(layer_types) != n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
      bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
      if bad:
        raise ConfigError(f"layer_types {bad} are not supported")
      if "sliding_attention" in layer_types and not window:
        raise ConfigError("layer_types has sliding_attention layers but no sliding window "
                          "(use_sliding_window is false or sliding_window is null)")
      windows = tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)

    eos = d.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    attention_bias = bool(d.get("attention_bias", False))
    return cls(
        model_type=mt,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(n_layers),
        num_heads=int(n_heads),
        num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(rope.get("original_max_position_embeddings",
                                                 d.get("max_position_embeddings", 8192))),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=(mt == "qwen2") or attention_bias,
        o_bias=attention_bias and mt != "qwen2",
        mlp_bias=bool(d.get("mlp_bias", False)),
        layer_windows=windows,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=d.get("pad_token_id"),
        hf=tuple(sorted((k, json.dumps(v)) for k, v in d.items())),
    )

  @classmethod
  def from_json_file(cls, path) -> "DecoderConfig":
    try:
      with open(path) as f:
        d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except IsADirectoryError:
      raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as e:
      raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(d, dict):
      raise ConfigError(f"{path}: not a JSON object")
    try:
      return cls.from_hf(d)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None

  def to_hf(self) -> dict[str, Any]:
    """The HF config.json dict: the original keys, with our fields written over them."""
    d = {k: json.loads(v) for k, v in self.hf}
    windows = set(self.layer_windows) - {0}
    d.update(
        model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, hidden_act="silu",
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
        bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
        eos_token_id=(list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                      else (self.eos_token_ids[0] if self.eos_token_ids else None)),
        architectures=[{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
    )
    rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type == "linear":
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_positions)
    d["rope_parameters"] = rope
    d.pop("rope_scaling", None)
    d["rope_theta"] = self.rope_theta
    if self.model_type == "llama":
      d["attention_bias"] = self.qkv_bias
      d["mlp_bias"] = self.mlp_bias
    if windows:
      if len(windows) > 1:
        raise ConfigError("layers with different sliding windows cannot be written to config.json")
      if self.model_type == "llama":
        raise ConfigError("llama has no sliding-window attention in transformers (use mistral or qwen2)")
      if self.model_type == "mistral" and 0 in self.layer_windows:
        raise ConfigError("mistral windows every layer in transformers; mixed full/sliding layers need qwen2")
      d["sliding_window"] = windows.pop()
      if self.model_type != "mistral":
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in self.layer_windows]
        d["use_sliding_window"] = True
    elif self.model_type in ("mistral", "qwen2"):
      d["sliding_window"] = None
      if self.model_type == "qwen2":
        d["layer_types"] = ["full_attention"] * self.num_layers
    return d

  def replace(self, **kw) -> "DecoderConfig":
    """A changed copy; the HF dict is re-derived so `to_hf` reflects the change."""
    new = dataclasses.replace(self, **kw)
    return dataclasses.replace(new, hf=tuple(sorted((k, json.dumps(v)) for k, v in new.to_hf().items())))

  @classmethod
  def make(cls, model_type="llama", **kw) -> "DecoderConfig":
    """A config from HF-named keyword arguments (for tests and the synthetic base)."""
    d = dict(model_type=model_type, hidden_act="silu", **kw)
    return cls.from_hf(d)
