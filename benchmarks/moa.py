"""Heterogeneous multi-LoRA batch: every example its own expert vs one LoRA merged into the weights,
ours (JAX, gathered per-example factors in one compiled forward) and peft (PyTorch, its
`adapter_names` mixed batch: a loop over the adapters present) on the same sizes.

A random llama-shaped model (default ~134M parameters: hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000), X = batch LoRA experts of rank 16 on all seven projections
(q, k, v, o, gate, up, down), fp32 on the CPU; forward pass (prefill) of a [batch, seq] batch.
Timed after warm-up, alternating, medians over `--runs`. torch uses all cores.

Rows: ours heterogeneous (expert i for example i) / ours merged (one LoRA folded into W) /
ours one LoRA unmerged; peft mixed batch (`adapter_names`) / peft merged (`merge_and_unload`).
Goal (issue 7): ours heterogeneous <= 1.3x ours merged.

Appends a section to docs/benchmarks.md and prints one JSON object as the last line.
Run: `.venv/bin/python benchmarks/moa.py` (`--small` for a quick smoke run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hidden", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--intermediate", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--small", action="store_true", help="tiny sizes, for a smoke test")
  ap.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
  args = ap.parse_args(argv)
  if args.small:
    args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 64, 2, 4, 128, 512
    args.seq, args.runs, args.rank = 32, 2, 4

  import jax
  import jax.numpy as jnp
  import peft
  import torch
  import transformers

  from calm_jax import hf, lora as L

  ncpu = os.cpu_count() or 1
  torch.set_num_threads(ncpu)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
      max_position_embeddings=4096, initializer_range=0.02, tie_word_embeddings=False)
  ref = transformers.LlamaForCausalLM(config).eval().to(torch.float32)
  n_params = sum(p.numel() for p in ref.parameters())
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    model = hf.load(tmp)
  cfg, params = model.config, model.params()
  X = args.batch

  # Ours: X stacked experts with random (nonzero) B.
  spec = L.LoRASpec.create(cfg, "layers/(q|k|v|o|gate|up|down)", rank=args.rank, alpha=2 * args.rank, num_experts=X)
  experts = L.init_lora(cfg, spec, 0)
  rng = np.random.default_rng(1)
  experts = {n: {"a": f["a"], "b": jnp.asarray(0.01 * rng.standard_normal(f["b"].shape), jnp.float32)}
             for n, f in experts.items()}
  n_lora = L.count_params(experts) // X
  tokens = jnp.asarray(rng.integers(2, args.vocab, (args.batch, args.seq)), jnp.int32)
  valid = jnp.ones(tokens.shape, bool)
  hetero_extra = L.lora_extra(experts, cfg.num_layers, experts=np.arange(args.batch) % X)
  one = jax.tree.map(lambda x: x[:, 0], experts)
  single_spec = spec.with_experts(None)
  merged = jax.block_until_ready(L.merge_lora(cfg, params, one, spec.scale))
  plain = L.LoRASpec((), 1, 1.0)  # no targets: the plain forward through the same jitted function

  def ours_hetero():
    return L.apply(cfg, spec.hooks(), params, hetero_extra, tokens, valid).block_until_ready()

  def ours_merged():
    return L.apply(cfg, plain.hooks(), merged, {"lora": {}}, tokens, valid).block_until_ready()

  def ours_single():
    return L.apply(cfg, single_spec.hooks(), params, L.lora_extra(one, cfg.num_layers), tokens, valid).block_until_ready()

  # peft: X adapters (random A and B: init_lora_weights=False), mixed batch by adapter_names.
  pcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
  pm = peft.get_peft_model(ref, pcfg, adapter_name="e0")
  for i in range(1, X):
    pm.add_adapter(f"e{i}", pcfg)
  pm.eval()
  names = [f"e{i % X}" for i in range(args.batch)]
  ids = torch.from_numpy(np.asarray(tokens)).long()
  # The merged peer: a copy of the peft model with adapter e0 merged and the rest dropped.
  import copy
  pm_merged = copy.deepcopy(pm)
  pm_merged.set_adapter("e0")
  torch_merged = pm_merged.merge_and_unload(adapter_names=["e0"]).eval()
  del pm_merged

  def peft_mixed():
    with torch.inference_mode():
      return pm(input_ids=ids, adapter_names=names).logits

  def peft_merged():
    with torch.inference_mode():
      return torch_merged(input_ids=ids).logits

  # Correctness side by side: our merged = our single unmerged; peft mixed row 0 = peft merged row 0.
  err_ours = float(jnp.abs(ours_merged() - ours_single()).max())
  err_peft = float((peft_mixed()[0] - peft_merged()[0]).abs().max())

  fns = {"ours_hetero": ours_hetero, "ours_merged": ours_merged, "ours_single": ours_single,
         "peft_mixed": peft_mixed, "peft_merged": peft_merged}
  for f in fns.values():  # warm-up (compiles)
    f()
  load_before = os.getloadavg()[0]
  times = {k: [] for k in fns}
  for _ in range(args.runs):
    for k, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t0)
  load = (load_before, os.getloadavg()[0])
  med = {k: statistics.median(v) for k, v in times.items()}
  result = {
      "hetero_vs_merged_ours": round(med["ours_hetero"] / med["ours_merged"], 3),
      "hetero_vs_merged_peft": round(med["peft_mixed"] / med["peft_merged"], 3),
      "speedup_vs_peft_mixed": round(med["peft_mixed"] / med["ours_hetero"], 2),
      "goal_met": med["ours_hetero"] / med["ours_merged"] <= 1.3,
  }
  print(f"params {n_params / 1e6:.1f}M, {X} experts of rank {args.rank} on 7 projections ({n_lora / 1e6:.2f}M each), "
        f"batch {args.batch} x {args.seq} tokens, fp32, {ncpu} CPUs")
  for k, v in times.items():
    print(f"{k:12s} median {med[k] * 1e3:8.1f} ms of {[round(t * 1e3, 1) for t in v]}")
  print(f"checks: max |ours merged - ours unmerged| {err_ours:.2e}; max |peft mixed row 0 - peft merged row 0| "
        f"{err_peft:.2e}")
  print(f"1-min load average before/after: {load[0]:.1f} / {load[1]:.1f} (other processes compete when > 0)")
  if not args.no_write and not args.small:
    _append(result, args, n_params, n_lora, times, med, ncpu, load, (err_ours, err_peft),
            (jax.__version__, torch.__version__, peft.__version__))
  print(json.dumps(result))


def _append(result, args, n_params, n_lora, times, med, ncpu, load, errs, versions):
  path = ROOT / "docs" / "benchmarks.md"
  if not path.exists():
    path.write_text("# Benchmarks\n")
  date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  rows = "\n".join(f"| {k} | {med[k] * 1e3:.1f} | {[round(t * 1e3, 1) for t in times[k]]} |" for k in times)
  text = f"""
## Heterogeneous multi-LoRA batch vs merged weights ({date} UTC)

- machine: `{platform.platform()}`, {ncpu} CPUs; jax {versions[0]}, torch {versions[1]}, peft {versions[2]};
  1-min load average before/after {load[0]:.2f} / {load[1]:.2f}
- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, intermediate
  {args.intermediate}, vocab {args.vocab}), fp32; {args.batch} LoRA experts, rank {args.rank}, all 7 projections
  ({n_lora / 1e6:.2f}M params each); forward of a {args.batch} x {args.seq} batch, every example a different expert;
  medians of {args.runs} alternating runs after warm-up
- ours: `calm_jax.lora.apply` with gathered per-example factors vs the same jitted forward on merged weights;
  peft: `model(input_ids, adapter_names=[...])` (loop over adapters) vs `merge_and_unload` of one adapter
- checks: max |ours merged − ours unmerged| {errs[0]:.1e}; max |peft mixed − peft merged| on the row using the
  merged adapter {errs[1]:.1e}
- command: `python benchmarks/moa.py {' '.join(sys.argv[1:])}`

| run | median ms | runs ms |
| --- | --- | --- |
{rows}

Heterogeneous / merged: ours **{result['hetero_vs_merged_ours']:.2f}x**, peft {result['hetero_vs_merged_peft']:.2f}x;
ours heterogeneous is {result['speedup_vs_peft_mixed']:.2f}x faster than peft's mixed batch.
Goal (issue 7): heterogeneous <= 1.3x merged: {'met' if result['goal_met'] else 'not met'}.
"""
  with open(path, "a") as f:
    f.write(text)


if __name__ == "__main__":
  main()
