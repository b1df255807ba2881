"""Heterogeneous multi-LoRA batch: every example its own expert vs one LoRA merged into the weights,
ours (JAX, gathered per-example factors in one compiled forward) and peft (PyTorch, its
`adapter_names` mixed batch: a loop over the adapters present) on the same sizes.

A random llama-shaped model (default ~134M parameters: hidden 768, 12 layers, 12 heads,
intermediate 2048, vocab 32000), X = batch LoRA experts of rank 16 on all seven projections
(q, k, v, o, gate, up, down), fp32 on the CPU; forward pass (prefill) of a [batch, seq] batch.
Timed after warm-up, alternating, medians over `--runs`. torch uses all cores. Each side's runs are
then timed again alone, in a process of its own that imports only its side's library
(`common.each_alone`; `--no-alone` skips it); each run's headline figure is the faster of its two medians.

Rows: ours heterogeneous (expert i for example i) / ours merged (one LoRA folded into W) /
ours one LoRA unmerged; peft mixed batch (`adapter_names`) / peft merged (`merge_and_unload`).
Goal: ours heterogeneous <= 1.3x ours merged.

Adds the run to docs/benchmarks.md (its section, and its row of the summary table; `common.write_run`)
and prints one JSON object of the headline figures as the last line.
Run: `.venv/bin/python benchmarks/moa.py` (`--small` for a quick smoke run).
"""
from __future__ import annotations

import copy

import numpy as np

import common

TITLE = "Heterogeneous multi-LoRA batch vs merged weights"
MODEL = dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None):
  ap = common.parser(__doc__, model=MODEL, runs=5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--rank", type=int, default=16)
  common.add_alone(ap)
  args = common.parse(ap, argv, small={**common.SMALL_MODEL, "seq": 32, "runs": 2, "rank": 4})

  machine = common.Machine("jax", "torch", "peft")
  if args.alone != "ours":
    machine.torch_all_cores()
  ref, model, n_params = common.random_llama(args, 0.02)
  tokens = np.random.default_rng(2).integers(2, args.vocab, (args.batch, args.seq))
  built = {}
  if model is not None:
    built["ours"], n_lora = _ours(args, model, tokens)
  if ref is not None:
    built["theirs"] = _peft(args, ref, tokens)
  # Correctness side by side (first calls, before the warm-up round): our merged = our single unmerged;
  # peft mixed row 0 = peft merged row 0.
  errs = {side: float(check()) for side, (_, check) in built.items()}
  fns = {k: fn for side_fns, _ in built.values() for k, fn in side_fns.items()}
  times = common.alternate(fns, args.runs, warmup=1)  # the warm-up round compiles
  med = common.medians(times)
  if args.alone:
    common.report(args, {"medians": med, "times": times})
    return

  alone = common.each_alone(args)
  machine.done()
  alone_med = {**(alone.get("ours", "medians") or {}), **(alone.get("theirs", "medians") or {})}
  alone_times = {**(alone.get("ours", "times") or {}), **(alone.get("theirs", "times") or {})}
  fast = {k: common.faster(m, alone_med.get(k)) for k, m in med.items()}
  result = {
      "hetero_vs_merged_ours": round(fast["ours_hetero"] / fast["ours_merged"], 3),
      "hetero_vs_merged_peft": round(fast["peft_mixed"] / fast["peft_merged"], 3),
      "speedup_vs_peft_mixed": round(fast["peft_mixed"] / fast["ours_hetero"], 2),
      "goal_met": fast["ours_hetero"] / fast["ours_merged"] <= 1.3,
      "median_ms_shared": {k: round(m * 1e3, 2) for k, m in med.items()},
      "median_ms_alone": {k: round(m * 1e3, 2) for k, m in alone_med.items()},
  }
  print(f"params {n_params / 1e6:.1f}M, {args.batch} experts of rank {args.rank} on 7 projections "
        f"({n_lora / 1e6:.2f}M each), batch {args.batch} x {args.seq} tokens, fp32, {machine.ncpu} CPUs")
  for k, v in times.items():
    also = f"; alone {alone_med[k] * 1e3:8.1f} ms of {common.ms(alone_times[k])}" if k in alone_med else ""
    print(f"{k:12s} median {med[k] * 1e3:8.1f} ms of {common.ms(v)}{also}")
  print(f"checks: max |ours merged - ours unmerged| {errs['ours']:.2e}; max |peft mixed row 0 - peft merged row 0| "
        f"{errs['theirs']:.2e}")
  machine.print_load()

  def write():
    ratio = (f"**{result['speedup_vs_peft_mixed']}x** the speed of peft's mixed batch (forward, {args.batch} experts "
             f"of rank {args.rank}, one per example); heterogeneous / merged time: ours "
             f"{result['hetero_vs_merged_ours']:.2f}x, peft {result['hetero_vs_merged_peft']:.2f}x (each run's faster "
             "of shared / alone process)")
    table = common.md_table(
        ["run", "median ms, shared process", "runs ms", "median ms, alone", "runs ms, alone"],
        [[k, f"{med[k] * 1e3:.1f}", common.ms(v), common.cell(result["median_ms_alone"].get(k)),
          common.ms(alone_times[k]) if k in alone_times else "-"] for k, v in times.items()])
    common.write_run(TITLE, f"""
{machine.line()}
- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, intermediate
  {args.intermediate}, vocab {args.vocab}), fp32; {args.batch} LoRA experts, rank {args.rank}, all 7 projections
  ({n_lora / 1e6:.2f}M params each); forward of a {args.batch} x {args.seq} batch, every example a different expert;
  medians of {args.runs} alternating runs after warm-up, all five in one process
{alone.line()}
- ours: `calm_jax.lora.apply` with gathered per-example factors vs the same jitted forward on merged weights;
  peft: `model(input_ids, adapter_names=[...])` (loop over adapters) vs `merge_and_unload` of one adapter
- checks: max |ours merged − ours unmerged| {errs['ours']:.1e}; max |peft mixed − peft merged| on the row using the
  merged adapter {errs['theirs']:.1e}
- code: {common.code_version()}; command: `{common.command()}`

{table}

Heterogeneous / merged (each run's faster figure): ours **{result['hetero_vs_merged_ours']:.2f}x**, peft
{result['hetero_vs_merged_peft']:.2f}x; ours heterogeneous is {result['speedup_vs_peft_mixed']:.2f}x faster than
peft's mixed batch. Goal: heterogeneous <= 1.3x merged: {'met' if result['goal_met'] else 'not met'}.
""", ratio, machine)

  common.report(args, result, write)


def _ours(args, model, tokens):
  """Our runs: X = batch stacked experts with random (nonzero) B, every example its own (hetero), one
  expert merged into W (merged), one unmerged (single). Returns (({name: run}, check), params per expert)."""
  import jax
  import jax.numpy as jnp

  from calm_jax import lora as L

  cfg, params = model.config, model.params()
  X = args.batch
  spec = L.LoRASpec.create(cfg, "layers/(q|k|v|o|gate|up|down)", rank=args.rank, alpha=2 * args.rank, num_experts=X)
  experts = L.init_lora(cfg, spec, 0)
  rng = np.random.default_rng(1)
  experts = {n: {"a": f["a"], "b": jnp.asarray(0.01 * rng.standard_normal(f["b"].shape), jnp.float32)}
             for n, f in experts.items()}
  n_lora = L.count_params(experts) // X
  tokens = jnp.asarray(tokens, jnp.int32)
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
    single_extra = L.lora_extra(one, cfg.num_layers)
    return L.apply(cfg, single_spec.hooks(), params, single_extra, tokens, valid).block_until_ready()

  def check():
    return jnp.abs(ours_merged() - ours_single()).max()

  return ({"ours_hetero": ours_hetero, "ours_merged": ours_merged, "ours_single": ours_single}, check), n_lora


def _peft(args, ref, tokens):
  """peft's runs: X adapters (random A and B: init_lora_weights=False), the mixed batch by adapter_names
  (mixed), and a copy with adapter e0 merged and the rest dropped (merged). Returns ({name: run}, check)."""
  import peft
  import torch

  X = args.batch
  pcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
  pm = peft.get_peft_model(ref, pcfg, adapter_name="e0")
  for i in range(1, X):
    pm.add_adapter(f"e{i}", pcfg)
  pm.eval()
  names = [f"e{i % X}" for i in range(args.batch)]
  ids = torch.from_numpy(tokens).long()
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

  def check():
    return (peft_mixed()[0] - peft_merged()[0]).abs().max()

  return {"peft_mixed": peft_mixed, "peft_merged": peft_merged}, check


if __name__ == "__main__":
  main()
