"""KV-cache greedy generation: `calm_jax.decoding.generate` vs transformers `generate`, same checkpoint.

A random llama-shaped model (default ~134M parameters: hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000) is saved with `save_pretrained` into a temporary directory and
loaded by both sides in fp32 on the CPU. Batch of unequal-length prompts (left-padded), greedy,
no EOS in the config so both sides produce exactly `--new` tokens per row. Both are warmed up
(our compile time is reported separately), then timed alternately; medians over `--runs`.
torch uses `torch.set_num_threads(os.cpu_count())`; XLA uses all cores by default.

Appends a section to docs/benchmarks.md and prints one JSON object as the last line.
Run: `.venv/bin/python benchmarks/generate.py` (`--small` for a quick smoke run).
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hidden", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--intermediate", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--min-prompt", type=int, default=32)
  ap.add_argument("--max-prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--init-std", type=float, default=0.1,
                  help="initializer_range; larger than HF's 0.02 so greedy argmax has few near-ties")
  ap.add_argument("--small", action="store_true", help="tiny sizes, for a smoke test")
  ap.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
  args = ap.parse_args(argv)
  if args.small:
    args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 64, 2, 4, 128, 512
    args.new, args.runs = 16, 2

  import torch
  import transformers
  import jax

  from calm_jax import decoding, hf

  ncpu = os.cpu_count() or 1
  torch.set_num_threads(ncpu)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
      max_position_embeddings=4096, initializer_range=args.init_std, bos_token_id=1, eos_token_id=None,
      pad_token_id=0, tie_word_embeddings=False)
  ref = transformers.LlamaForCausalLM(config).eval().to(torch.float32)
  n_params = sum(p.numel() for p in ref.parameters())

  rng = np.random.default_rng(0)
  lens = rng.integers(args.min_prompt, args.max_prompt + 1, args.batch)
  prompts = [rng.integers(2, args.vocab, n).tolist() for n in lens]
  width = max(lens)
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    model = hf.load(tmp)

  def run_ours():
    return decoding.generate(model, prompts, max_new_tokens=args.new, eos_token_id=[])

  def run_hf():
    with torch.inference_mode():
      out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                         do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()

  # Our compile time: JAX reports trace, lowering and XLA compile durations as monitoring events.
  compile_events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **_: compile_events.append(secs) if name.startswith("/jax/core/compile/") else None)
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  ours = run_ours()
  first_call_s = time.perf_counter() - t0
  compile_s = sum(compile_events)
  theirs = run_hf()  # warm-up
  run_ours()
  assert all(len(r) == args.new for r in ours) and all(len(r) == args.new for r in theirs)
  same = np.mean(np.array(ours) == np.array(theirs))
  first_diff = [next((j for j, (a, b) in enumerate(zip(r, s)) if a != b), args.new) for r, s in zip(ours, theirs)]

  t_ours, t_hf = [], []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    run_ours()
    t_ours.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    run_hf()
    t_hf.append(time.perf_counter() - t0)
  load = (load_before, os.getloadavg()[0])
  n_tokens = args.batch * args.new
  med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
  result = {
      "tokens_per_s_ours": round(n_tokens / med_ours, 1),
      "tokens_per_s_hf": round(n_tokens / med_hf, 1),
      "speedup_vs_transformers": round(med_hf / med_ours, 2),
      "compile_s_ours": round(compile_s, 2),
      "identical_token_fraction": round(float(same), 4),
  }
  print(f"params {n_params / 1e6:.1f}M, batch {args.batch}, prompts {min(lens)}-{max(lens)} tokens, "
        f"{args.new} new tokens, greedy fp32, {ncpu} CPUs (torch threads {torch.get_num_threads()})")
  print(f"ours: median {med_ours:.3f}s of {[round(t, 3) for t in t_ours]} "
        f"(first call {first_call_s:.2f}s, of which compile {compile_s:.2f}s)")
  print(f"transformers {transformers.__version__}: median {med_hf:.3f}s of {[round(t, 3) for t in t_hf]}")
  print(f"identical tokens {same:.4f}; first difference per row {first_diff}")
  print(f"1-min load average before/after: {load[0]:.1f} / {load[1]:.1f} (other processes compete when > 0)")

  if not args.no_write and not args.small:
    _append(result, args, n_params, lens, t_ours, t_hf, ncpu, jax.__version__, transformers.__version__,
             torch.__version__, first_diff, load)
  print(json.dumps(result))


def _append(result, args, n_params, lens, t_ours, t_hf, ncpu, jax_v, tf_v, torch_v, first_diff, load):
  med_ours, med_hf = statistics.median(t_ours), statistics.median(t_hf)
  path = ROOT / "docs" / "benchmarks.md"
  path.parent.mkdir(exist_ok=True)
  if not path.exists():
    path.write_text("# Benchmarks\n\nSide-by-side runs against the peer tools, one section per run; ratios matter, "
                    "absolute times depend on the machine.\n")
  cmd = "python benchmarks/generate.py " + " ".join(sys.argv[1:])
  date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  text = f"""
## KV-cache generation vs transformers `generate` ({date})

- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, {ncpu} CPUs;
  jax {jax_v}, transformers {tf_v}, torch {torch_v} (`torch.set_num_threads({ncpu})`);
  1-min load average before/after the run {load[0]:.1f} / {load[1]:.1f}
- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, {args.heads} heads,
  intermediate {args.intermediate}, vocab {args.vocab}), fp32, init std {args.init_std}
- workload: batch {args.batch}, left-padded prompts of {min(lens)}-{max(lens)} tokens, {args.new} new tokens, greedy,
  no EOS; median of {args.runs} timed runs after warm-up
- command: `{cmd.strip()}`

| | median s | min s | tokens/s (median) | compile s |
| --- | --- | --- | --- | --- |
| calm_jax `decoding.generate` | {med_ours:.3f} | {min(t_ours):.3f} | {result['tokens_per_s_ours']} | {result['compile_s_ours']} |
| transformers `generate` | {med_hf:.3f} | {min(t_hf):.3f} | {result['tokens_per_s_hf']} | - |

speedup vs transformers: **{result['speedup_vs_transformers']}x**; identical tokens:
{result['identical_token_fraction']} (first difference per row: {first_diff}). Both sides slow down when other
processes compete for the cores (load average above), torch's OpenMP loops much more than XLA's: compare
runs made under similar load.
"""
  with open(path, "a") as f:
    f.write(text)


if __name__ == "__main__":
  main()
