"""KV-cache greedy generation: `calm_jax.decoding.generate` vs transformers `generate`, same checkpoint.

A random llama-shaped model (default ~134M parameters: hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000) is saved with `save_pretrained` into a temporary directory and
loaded by both sides in fp32 on the CPU. Batch of unequal-length prompts (left-padded), greedy,
no EOS in the config so both sides produce exactly `--new` tokens per row. Both are warmed up
(our compile time is reported separately), then timed alternately; medians over `--runs`.
torch uses `torch.set_num_threads(os.cpu_count())`; XLA uses all cores by default.

Adds the run to docs/benchmarks.md (its section, and its row of the summary table; `common.write_run`)
and prints one JSON object of the headline figures as the last line.
Run: `.venv/bin/python benchmarks/generate.py` (`--small` for a quick smoke run).
"""
from __future__ import annotations

import numpy as np

import common

TITLE = "KV-cache generation vs transformers `generate`"
MODEL = dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000)


def main(argv=None):
  ap = common.parser(__doc__, model=MODEL, runs=3)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--min-prompt", type=int, default=32)
  ap.add_argument("--max-prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--init-std", type=float, default=0.1,
                  help="initializer_range; larger than HF's 0.02 so greedy argmax has few near-ties")
  args = common.parse(ap, argv, small={**common.SMALL_MODEL, "new": 16, "runs": 2})

  import torch

  from calm_jax import decoding

  machine = common.Machine("jax", "transformers", "torch")
  machine.torch_all_cores()
  ref, model, n_params = common.random_llama(args, args.init_std, bos_token_id=1, eos_token_id=None, pad_token_id=0)

  rng = np.random.default_rng(0)
  lens = rng.integers(args.min_prompt, args.max_prompt + 1, args.batch)
  prompts = [rng.integers(2, args.vocab, n).tolist() for n in lens]
  width = max(lens)
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

  def run_ours():
    return decoding.generate(model, prompts, max_new_tokens=args.new, eos_token_id=[])

  def run_hf():
    with torch.inference_mode():
      out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                         do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()

  compile_time = common.CompileTime()
  ours, first_call_s = common.timed(run_ours)
  compile_s = compile_time.seconds
  theirs = run_hf()  # warm-up
  run_ours()
  assert all(len(r) == args.new for r in ours) and all(len(r) == args.new for r in theirs)
  same = np.mean(np.array(ours) == np.array(theirs))
  first_diff = [next((j for j, (a, b) in enumerate(zip(r, s)) if a != b), args.new) for r, s in zip(ours, theirs)]

  times = common.alternate({"ours": run_ours, "hf": run_hf}, args.runs)
  machine.done()
  med = common.medians(times)
  n_tokens = args.batch * args.new
  result = {
      "tokens_per_s_ours": round(n_tokens / med["ours"], 1),
      "tokens_per_s_hf": round(n_tokens / med["hf"], 1),
      "speedup_vs_transformers": round(med["hf"] / med["ours"], 2),
      "compile_s_ours": round(compile_s, 2),
      "identical_token_fraction": round(float(same), 4),
  }
  print(f"params {n_params / 1e6:.1f}M, batch {args.batch}, prompts {min(lens)}-{max(lens)} tokens, "
        f"{args.new} new tokens, greedy fp32, {machine.ncpu} CPUs (torch threads {machine.torch_threads})")
  print(f"ours: median {med['ours']:.3f}s of {[round(t, 3) for t in times['ours']]} "
        f"(first call {first_call_s:.2f}s, of which compile {compile_s:.2f}s)")
  print(f"transformers: median {med['hf']:.3f}s of {[round(t, 3) for t in times['hf']]}")
  print(f"identical tokens {same:.4f}; first difference per row {first_diff}")
  machine.print_load()

  def write():
    ratio = (f"**{result['speedup_vs_transformers']}x** transformers' tokens/s (greedy decode, batch {args.batch}, "
             f"{args.new} new tokens, {n_params / 1e6:.1f}M params, fp32)")
    table = common.md_table(["", "median s", "min s", "tokens/s (median)", "compile s"], [
        ["calm_jax `decoding.generate`", f"{med['ours']:.3f}", f"{min(times['ours']):.3f}",
         result["tokens_per_s_ours"], result["compile_s_ours"]],
        ["transformers `generate`", f"{med['hf']:.3f}", f"{min(times['hf']):.3f}", result["tokens_per_s_hf"], "-"]])
    common.write_run(TITLE, f"""
{machine.line()}
- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, {args.heads} heads,
  intermediate {args.intermediate}, vocab {args.vocab}), fp32, init std {args.init_std}
- workload: batch {args.batch}, left-padded prompts of {min(lens)}-{max(lens)} tokens, {args.new} new tokens, greedy,
  no EOS; median of {args.runs} timed runs after warm-up
- code: {common.code_version()}; command: `{common.command()}`

{table}

speedup vs transformers: **{result['speedup_vs_transformers']}x**; identical tokens:
{result['identical_token_fraction']} (first difference per row: {first_diff}). Both sides slow down when other
processes compete for the cores (load average above), torch's OpenMP loops much more than XLA's: compare
runs made under similar load.
""", ratio, machine)

  common.report(args, result, write)


if __name__ == "__main__":
  main()
