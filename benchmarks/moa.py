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
  args = common.parse(ap, argv, small={**common.SMALL_MODEL, "seq": 32, "runs": 2, "rank": 4})

  import jax
  import jax.numpy as jnp
  import peft
  import torch

  from calm_jax import lora as L

  machine = common.Machine("jax", "torch", "peft")
  machine.torch_all_cores()
  ref, model, n_params = common.random_llama(args, 0.02)
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
    single_extra = L.lora_extra(one, cfg.num_layers)
    return L.apply(cfg, single_spec.hooks(), params, single_extra, tokens, valid).block_until_ready()

  # peft: X adapters (random A and B: init_lora_weights=False), mixed batch by adapter_names.
  pcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
  pm = peft.get_peft_model(ref, pcfg, adapter_name="e0")
  for i in range(1, X):
    pm.add_adapter(f"e{i}", pcfg)
  pm.eval()
  names = [f"e{i % X}" for i in range(args.batch)]
  ids = torch.from_numpy(np.asarray(tokens)).long()
  # The merged peer: a copy of the peft model with adapter e0 merged and the rest dropped.
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
  times = common.alternate(fns, args.runs, warmup=1)  # the warm-up round compiles
  machine.done()
  med = common.medians(times)
  result = {
      "hetero_vs_merged_ours": round(med["ours_hetero"] / med["ours_merged"], 3),
      "hetero_vs_merged_peft": round(med["peft_mixed"] / med["peft_merged"], 3),
      "speedup_vs_peft_mixed": round(med["peft_mixed"] / med["ours_hetero"], 2),
      "goal_met": med["ours_hetero"] / med["ours_merged"] <= 1.3,
  }
  print(f"params {n_params / 1e6:.1f}M, {X} experts of rank {args.rank} on 7 projections ({n_lora / 1e6:.2f}M each), "
        f"batch {args.batch} x {args.seq} tokens, fp32, {machine.ncpu} CPUs")
  for k, v in times.items():
    print(f"{k:12s} median {med[k] * 1e3:8.1f} ms of {common.ms(v)}")
  print(f"checks: max |ours merged - ours unmerged| {err_ours:.2e}; max |peft mixed row 0 - peft merged row 0| "
        f"{err_peft:.2e}")
  machine.print_load()

  def write():
    ratio = (f"**{result['speedup_vs_peft_mixed']}x** the speed of peft's mixed batch (forward, {X} experts of rank "
             f"{args.rank}, one per example); heterogeneous / merged time: ours "
             f"{result['hetero_vs_merged_ours']:.2f}x, peft {result['hetero_vs_merged_peft']:.2f}x")
    table = common.md_table(["run", "median ms", "runs ms"], [[k, f"{med[k] * 1e3:.1f}", common.ms(v)]
                                                              for k, v in times.items()])
    common.write_run(TITLE, f"""
{machine.line()}
- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, intermediate
  {args.intermediate}, vocab {args.vocab}), fp32; {args.batch} LoRA experts, rank {args.rank}, all 7 projections
  ({n_lora / 1e6:.2f}M params each); forward of a {args.batch} x {args.seq} batch, every example a different expert;
  medians of {args.runs} alternating runs after warm-up
- ours: `calm_jax.lora.apply` with gathered per-example factors vs the same jitted forward on merged weights;
  peft: `model(input_ids, adapter_names=[...])` (loop over adapters) vs `merge_and_unload` of one adapter
- checks: max |ours merged − ours unmerged| {err_ours:.1e}; max |peft mixed − peft merged| on the row using the
  merged adapter {err_peft:.1e}
- code: {common.code_version()}; command: `{common.command()}`

{table}

Heterogeneous / merged: ours **{result['hetero_vs_merged_ours']:.2f}x**, peft {result['hetero_vs_merged_peft']:.2f}x;
ours heterogeneous is {result['speedup_vs_peft_mixed']:.2f}x faster than peft's mixed batch.
Goal (issue 7): heterogeneous <= 1.3x merged: {'met' if result['goal_met'] else 'not met'}.
""", ratio, machine)

  common.report(args, result, write)


if __name__ == "__main__":
  main()
