"""Glue every experiment shares: build a decoder from a config, score it on the suite,
write results.json and a PNG chart into the workdir."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from calm_jax.atomic import atomic_write_text
from calm_jax.models import Decoder, DecoderConfig, init_params, nest, param_specs
from calm_jax.tasks import evaluate, make_eval_set

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def decoder_config(model_cfg, tokenizer) -> DecoderConfig:
  """A llama-family DecoderConfig from a `config.model` block, with the tokenizer's specials."""
  d = {k: v for k, v in dict(model_cfg).items() if k not in ("init_std", "dtype")}
  return DecoderConfig.make(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **d)


def random_params(cfg: DecoderConfig, key, dtype, std: float):
  """Random parameters drawn on device (jax.random): jit-able, so they can be born sharded."""
  specs = sorted(param_specs(cfg).items())
  keys = jax.random.split(key, len(specs))
  flat = {}
  for k, (name, spec) in zip(keys, specs):
    if spec.init == "normal":
      flat[name] = (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
    else:
      flat[name] = (jnp.ones if spec.init == "ones" else jnp.zeros)(spec.shape, dtype)
  return nest(flat)


def build_decoder(model_cfg, tokenizer, seed: int, mesh=None, rules=None) -> Decoder:
  """A randomly initialised decoder; with a mesh, created already sharded by the logical rules
  (eval_shape -> shardings -> jitted init), so no device ever holds the whole model."""
  cfg = decoder_config(model_cfg, tokenizer)
  dtype = DTYPES[model_cfg.dtype]
  std = float(model_cfg.init_std)
  if mesh is None:
    return Decoder(cfg, params=init_params(cfg, seed, dtype, std=std))
  from calm_jax import sharding
  shardings = sharding.param_shardings(cfg, mesh, rules or sharding.DEFAULT_RULES)
  init = jax.jit(random_params, static_argnums=(0, 2, 3), out_shardings=shardings)
  return Decoder(cfg, params=init(cfg, jax.random.key(seed), dtype, std))


def suite_accuracy(model, tokenizer, tasks, *, n_per_task: int, split: str = "test", batch_size: int = 256,
                   seed: int = 0, registry=None, generate_kwargs=None) -> dict[str, float]:
  """Exact-match accuracy per task (+ "overall") of greedy generations on a split."""
  from calm_jax.decoding import generate
  examples = make_eval_set(list(tasks), n_per_task, split=split, seed=seed, registry=registry)
  gen = functools.partial(generate, model, temperature=0.0, **(generate_kwargs or {}))
  return evaluate(lambda prompts, n: gen(prompts, max_new_tokens=n), tokenizer, examples,
                  batch_size=batch_size, registry=registry)


def majority_baseline(tasks, *, n_per_task: int, split: str = "test", registry=None) -> dict[str, float]:
  """Chance level per task: accuracy of always answering the train split's most common answer."""
  from collections import Counter

  from calm_jax.tasks import get_task
  out = {}
  for name in tasks:
    task = (registry or {}).get(name) or get_task(name)
    train = Counter(ex.answer for ex in task.split("train", min(2000, task.num_prompts or 2000), seed=0))
    mode = train.most_common(1)[0][0]
    n = n_per_task if task.num_prompts is None else min(n_per_task, task.num_prompts)
    test = task.split(split, n, seed=0)
    out[name] = sum(ex.answer == mode for ex in test) / len(test)
  return out


def write_results(workdir, results: dict) -> Path:
  path = Path(workdir) / "results.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True))
  return path


def bar_chart(path, groups: dict[str, dict[str, float]], title: str, ylabel: str = "accuracy") -> Path:
  """Grouped bar chart: groups = {series: {category: value}}, saved as PNG. Drawn on a bare Figure, not
  pyplot, so that a run inside a notebook leaves the session's plotting backend alone."""
  import numpy as np
  from matplotlib.figure import Figure

  series = list(groups)
  cats = sorted({c for g in groups.values() for c in g})
  x = np.arange(len(cats))
  w = 0.8 / max(len(series), 1)
  fig = Figure(figsize=(max(6, 0.9 * len(cats) + 2), 4))
  ax = fig.add_subplot()
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
