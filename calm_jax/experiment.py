"""Glue every experiment shares: build a decoder from a config, score it on the suite,
write results.json and a PNG chart into the workdir."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from calm_jax.atomic import atomic_write_text
from calm_jax.models import Decoder, DecoderConfig, init_params
from calm_jax.tasks import evaluate, make_eval_set
from calm_jax.tokenizers import CharTokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def decoder_config(model_cfg, tokenizer) -> DecoderConfig:
  """A llama-family DecoderConfig from a `config.model` block, with the tokenizer's specials."""
  d = {k: v for k, v in dict(model_cfg).items() if k not in ("init_std", "dtype")}
  return DecoderConfig.make(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **d)


def build_decoder(model_cfg, tokenizer, seed: int) -> Decoder:
  cfg = decoder_config(model_cfg, tokenizer)
  params = init_params(cfg, seed, DTYPES[model_cfg.get("dtype", "float32")],
                       std=float(model_cfg.get("init_std", 0.02)))
  return Decoder(cfg, params=params)


def suite_accuracy(model, tokenizer, tasks, *, n_per_task: int, split: str = "test", batch_size: int = 256,
                   seed: int = 0, registry=None, generate_kwargs=None) -> dict[str, float]:
  """Exact-match accuracy per task (+ "overall") of greedy generations on a split."""
  from calm_jax.decoding import generate
  examples = make_eval_set(list(tasks), n_per_task, split=split, seed=seed, registry=registry)
  gen = functools.partial(generate, model, temperature=0.0, **(generate_kwargs or {}))
  return evaluate(lambda prompts, n: gen(prompts, max_new_tokens=n), tokenizer, examples,
                  batch_size=batch_size, registry=registry)


def write_results(workdir, results: dict) -> Path:
  path = Path(workdir) / "results.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True))
  return path


def bar_chart(path, groups: dict[str, dict[str, float]], title: str, ylabel: str = "accuracy") -> Path:
  """Grouped bar chart: groups = {series: {category: value}}, saved as PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  series = list(groups)
  cats = sorted({c for g in groups.values() for c in g})
  x = np.arange(len(cats))
  w = 0.8 / max(len(series), 1)
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats) + 2), 4))
  for i, s in enumerate(series):
    ax.bar(x + i * w - 0.4 + w / 2, [groups[s].get(c, 0.0) for c in cats], w, label=s)
  ax.set_xticks(x, cats, rotation=30, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 1.05 if ylabel == "accuracy" else None)
  ax.set_title(title)
  if len(series) > 1:
    ax.legend()
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def print_table(title: str, rows: dict[str, dict[str, float]]) -> str:
  """Markdown table: one row per key of `rows`, one column per task."""
  cols = sorted({c for r in rows.values() for c in r if c != "overall"}) + (
      ["overall"] if any("overall" in r for r in rows.values()) else [])
  lines = [f"### {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" if c in r else "" for c in cols) + " |")
  text = "\n".join(lines)
  print(text)
  return text
