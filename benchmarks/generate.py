"""KV-cache greedy generation: `calm_jax.decoding.generate` vs transformers `generate`, same checkpoint.

A random llama-shaped model (default ~134M parameters: hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000) is saved with `save_pretrained` into a temporary directory and
loaded by both sides in fp32 on the CPU. Batch of unequal-length prompts (left-padded), greedy,
no EOS in the config so both sides produce exactly `--new` tokens per row. Both are warmed up
(our compile time is reported separately), then timed alternately; medians over `--runs`.
torch uses `torch.set_num_threads(os.cpu_count())`; XLA uses all cores by default. Each side is then
timed again alone, in a process of its own that imports only its side's library (`common.each_alone`;
`--no-alone` skips it); each side's headline figure is the faster of its two medians.

`--model=smollm2-135m-instruct` (any `launch.fetch` name or HF directory) times a real model instead: chat
prompts through its template, `--new` 64 by default; run it at `--batch 1` and `--batch 8` (each its own
row of the summary table).

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
  ap.add_argument("--new", type=int, default=None, help="new tokens per row (default 128; 64 with --model)")
  ap.add_argument("--model", default=None, help="a real model (launch.fetch name or HF directory), not a random one")
  ap.add_argument("--init-std", type=float, default=0.1,
                  help="initializer_range; larger than HF's 0.02 so greedy argmax has few near-ties")
  common.add_alone(ap)
  args = common.parse(ap, argv, small={**common.SMALL_MODEL, "new": 16, "runs": 2})

  machine = common.Machine("jax", "transformers", "torch")
  if args.alone != "ours":
    machine.torch_all_cores()
  args.new = args.new or (64 if args.model else 128)
  if args.model:
    ref, model, n_params, prompts, pad = _real_model(args)
  else:
    ref, model, n_params = common.random_llama(args, args.init_std, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    rng = np.random.default_rng(0)
    lens = rng.integers(args.min_prompt, args.max_prompt + 1, args.batch)
    prompts, pad = [rng.integers(2, args.vocab, n).tolist() for n in lens], 0
  lens = [len(p) for p in prompts]
  runs = {}
  if model is not None:
    runs["ours"] = _ours(args, model, prompts)
  if ref is not None:
    runs["theirs"] = _hf(args, ref, prompts, pad)
  outs, times, first_call_s, compile_s = _measure(args, runs)
  if args.alone:
    common.report(args, {"median": common.medians(times)[args.alone], "times": times[args.alone]})
    return

  ours, theirs = outs["ours"], outs["theirs"]
  assert all(len(r) == args.new for r in ours) and all(len(r) == args.new for r in theirs)
  same = np.mean(np.array(ours) == np.array(theirs))
  first_diff = [next((j for j, (a, b) in enumerate(zip(r, s)) if a != b), args.new) for r, s in zip(ours, theirs)]
  med = common.medians(times)
  alone = common.each_alone(args)
  machine.done()
  fast = {side: common.faster(med[side], alone.get(side, "median")) for side in med}
  n_tokens = args.batch * args.new

  def tok_s(seconds):
    return None if seconds is None else round(n_tokens / seconds, 1)

  result = {
      "tokens_per_s_ours": tok_s(fast["ours"]),
      "tokens_per_s_hf": tok_s(fast["theirs"]),
      "speedup_vs_transformers": round(fast["theirs"] / fast["ours"], 2),
      "compile_s_ours": round(compile_s, 2),
      "identical_token_fraction": round(float(same), 4),
      "tokens_per_s_ours_shared": tok_s(med["ours"]),
      "tokens_per_s_hf_shared": tok_s(med["theirs"]),
      "tokens_per_s_ours_alone": tok_s(alone.get("ours", "median")),
      "tokens_per_s_hf_alone": tok_s(alone.get("theirs", "median")),
  }
  print(f"params {n_params / 1e6:.1f}M, batch {args.batch}, prompts {min(lens)}-{max(lens)} tokens, "
        f"{args.new} new tokens, greedy fp32, {machine.ncpu} CPUs (torch threads {machine.torch_threads})")
  for side, name in (("ours", "ours"), ("theirs", "transformers")):
    extra = f" (first call {first_call_s:.2f}s, of which compile {compile_s:.2f}s)" if side == "ours" else ""
    print(f"{name}: median {med[side]:.3f}s of {[round(t, 3) for t in times[side]]}{extra}")
    if alone[side]:
      print(f"  alone in its own process: median {alone.get(side, 'median'):.3f}s of "
            f"{[round(t, 3) for t in alone.get(side, 'times')]}")
  print(f"speedup, the faster figure of each side: {result['speedup_vs_transformers']:.2f}x")
  print(f"identical tokens {same:.4f}; first difference per row {first_diff}")
  machine.print_load()

  what = (f"{args.model}, {n_params / 1e6:.1f}M params" if args.model else f"{n_params / 1e6:.1f}M params")

  def write():
    ratio = (f"**{result['speedup_vs_transformers']}x** transformers' tokens/s (greedy decode, batch {args.batch}, "
             f"{args.new} new tokens, {what}, fp32; each side's faster of shared / alone process)")

    def row(side, name, compile_cell):
      alone_times = alone.get(side, "times")
      return [name, f"{med[side]:.3f}", f"{min(times[side]):.3f}", common.cell(alone.get(side, "median"), ".3f"),
              common.cell(alone_times and min(alone_times), ".3f"), tok_s(fast[side]), compile_cell]

    table = common.md_table(["", "median s, shared process", "min s", "median s, alone", "min s, alone",
                             "tokens/s (faster median)", "compile s"],
                            [row("ours", "calm_jax `decoding.generate`", result["compile_s_ours"]),
                             row("theirs", "transformers `generate`", "-")])
    model_line = (f"- model: {args.model} ({n_params / 1e6:.1f}M params, its config as fetched), fp32; chat prompts "
                  "through its template" if args.model else
                  f"- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
                  f"{args.heads} heads,\n  intermediate {args.intermediate}, vocab {args.vocab}), fp32, init std "
                  f"{args.init_std}")
    common.write_run(_title(args), f"""
{machine.line()}
{model_line}
- workload: batch {args.batch}, left-padded prompts of {min(lens)}-{max(lens)} tokens, {args.new} new tokens, greedy,
  no EOS; median of {args.runs} timed runs after warm-up, the two sides alternating in one process
{alone.line()}
- code: {common.code_version()}; command: `{common.command()}`

{table}

speedup vs transformers: **{result['speedup_vs_transformers']}x**; identical tokens:
{result['identical_token_fraction']} (first difference per row: {first_diff}). Both sides slow down when other
processes compete for the cores (load average above), torch's OpenMP loops much more than XLA's: compare
runs made under similar load.
""", ratio, machine)

  common.report(args, result, write)


def _ours(args, model, prompts):
  """Our greedy generation of args.new tokens per prompt."""
  from calm_jax import decoding

  def run():
    return decoding.generate(model, prompts, max_new_tokens=args.new, eos_token_id=[])

  return run


def _title(args) -> str:
  return f"{TITLE} ({args.model}, batch {args.batch})" if args.model else TITLE


CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers.",
        "Explain in one sentence what a neural network is.", "How many legs does a spider have?",
        "Give me a synonym for happy.", "What is 17 times 3?", "Describe the colour blue to someone who cannot see."]


def _real_model(args):
  """The fetched model on both sides, and chat prompts through its template. The parent writes the
  directory and the prompt ids to the scratch folder, so that a side alone imports only its library."""
  import json

  info = common.scratch(args) / "real_model.json"
  if not args.alone:
    from calm_jax.fetch import MODELS, fetch
    path = fetch(args.model) if args.model in MODELS else args.model
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": CHAT[i % len(CHAT)]}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False))
               for i in range(args.batch)]
    info.write_text(json.dumps({"path": str(path), "prompts": prompts, "pad": tok.pad_token_id}))
  meta = json.loads(info.read_text())
  ref = model = None
  if args.alone != "ours":
    import torch
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(meta["path"], dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # exactly --new tokens, and no EOS suppression changing the argmax
    n_params = sum(p.numel() for p in ref.parameters())
  if args.alone != "theirs":
    import jax

    from calm_jax import hf
    model = hf.load(meta["path"])
    n_params = sum(x.size for x in jax.tree.leaves(model.params()))
  return ref, model, n_params, meta["prompts"], meta["pad"]


def _hf(args, ref, prompts, pad):
  """transformers' greedy generation of exactly args.new tokens per left-padded prompt."""
  import torch

  width = max(len(p) for p in prompts)
  ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

  def run():
    with torch.inference_mode():
      out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                         do_sample=False, pad_token_id=pad)
    return out[:, width:].tolist()

  return run


def _measure(args, runs):
  """The sides in `runs` (both, or one alone): ours' first call (timed; its compile seconds counted),
  transformers' warm-up call, ours' second call, then args.runs timed rounds, the sides alternating.
  Returns ({side: first output}, {side: seconds per run}, ours' first-call s, ours' compile s)."""
  outs, first_call_s, compile_s = {}, None, None
  if "ours" in runs:
    compile_time = common.CompileTime()
    outs["ours"], first_call_s = common.timed(runs["ours"])
    compile_s = compile_time.seconds
  if "theirs" in runs:
    outs["theirs"] = runs["theirs"]()  # warm-up
  if "ours" in runs:
    runs["ours"]()
  return outs, common.alternate(runs, args.runs), first_call_s, compile_s


if __name__ == "__main__":
  main()
