"""Tiny llama checkpoints for the merging tests: a `transformers` base and "fine-tuned" variants.

Not a test module. The base is a seeded `LlamaForCausalLM` saved with `save_pretrained`; each
fine-tuned model is the base plus a sparse perturbation (a random fraction of the entries of
each tensor, magnitudes varying by model and by tensor), written sharded with our writer so
the merges read sharded and single-file inputs. Sizes are chosen so that every tensor has one
of three element counts (2048, 1024, 32): the kernels compile once per count.
"""
import json
import shutil
from pathlib import Path

import numpy as np

from calm_jax.safetensors_io import CheckpointReader, ShardedWriter

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=64, max_position_embeddings=64, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
SCALES = (0.01, 0.03, 0.1)      # typical |τ| of the three fine-tuned models
FRACTIONS = (0.3, 0.6, 0.9)     # fraction of entries each one changes


def make_base(path, **overrides) -> Path:
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return Path(path)


def read(path) -> dict[str, np.ndarray]:
  r = CheckpointReader(path)
  return {n: np.array(r.get(n)) for n in r.keys()}


def write(path, tensors: dict, like, max_shard_size="8KB", config: dict | None = None) -> Path:
  """An HF directory holding `tensors`, with config.json from `like` (or `config`)."""
  path = Path(path)
  path.mkdir(parents=True)
  cfg = config if config is not None else json.loads((Path(like) / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(cfg))
  with ShardedWriter(path, [(n, a.shape, a.dtype) for n, a in tensors.items()], max_shard_size) as w:
    for n, a in tensors.items():
      w.write(n, a)
  return path


def perturb(tensors: dict, seed: int, scale: float, fraction: float) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for j, (n, a) in enumerate(sorted(tensors.items())):
    mag = scale * (1 + j % 4)  # magnitudes vary by tensor too
    delta = np.where(rng.random(a.shape) < fraction, rng.normal(0, mag, a.shape), 0).astype(a.dtype)
    out[n] = a + delta
  return out


def make_zoo(root, **overrides) -> tuple[Path, list[Path]]:
  """base + 3 fine-tuned models in root/base, root/ft0..2; `overrides` change the llama config."""
  root = Path(root)
  base = make_base(root / "base", **overrides)
  tensors = read(base)
  fts = [write(root / f"ft{i}", perturb(tensors, 100 + i, s, f), base)
         for i, (s, f) in enumerate(zip(SCALES, FRACTIONS))]
  return base, fts


def copy_model(src, dst) -> Path:
  shutil.copytree(src, dst)
  return Path(dst)
