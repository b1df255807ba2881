"""CALM training step: ours (`calm`, jitted) vs CALM-pytorch 0.2.2 at matched sizes.

Both sides compose a random anchor with one random augmenting decoder of the same shape family
(pre-RMSNorm, rotary, SwiGLU, no biases: our llama vs x-transformers `Decoder(rotary_pos_emb,
ff_glu, ff_swish, use_rmsnorm)`), the same widths, depths, heads (the cross-attention uses the
anchor's heads and head size on both sides), the same number of connections (N_A / 4), the same
batch of token sequences and vocabulary, fp32 on the CPU. One training step = forward of the
frozen augmenting model, the anchor with cross-attention, next-token loss, backward into the
composition parameters only, one AdamW update (ours: the core trainer's optimizer on the
`ComposeParam` split; theirs: `torch.optim.AdamW` over `calm.parameters()` that require grad).
CALM-pytorch's augmenting model reads the sequence as its `prompt` (its encoder-style
interface); ours reads it under the causal cross mask: the same amount of work.
Both are warmed up (two blocks), then timed alternately in blocks of `--steps`; medians over `--runs`.
torch uses `torch.set_num_threads(os.cpu_count())`. The process re-executes itself under
`calm_jax.malloc.TUNED` (the allocator `launch.train` runs under), so both sides share it.
Sharing one process slows both sides (each ~10% here: caches, heap, the other's idle threads), so
each side is timed again alone in its own process, as its users run it: ours under TUNED,
CALM-pytorch under glibc's defaults (`common.each_alone`; `--no-alone` skips it). Each side's figure is
the faster of its two medians.

`--sweep` adds rows at other sizes (smaller models; a longer sequence). Each row states the step's
matmul FLOPs (`step_flops`, from the shapes) and both sides' GFLOP/s beside the machine's fp32
matmul rate, so a compute-bound size shows as such.

Adds the run to docs/benchmarks.md (its section, and its row of the summary table; `common.write_run`)
and prints one JSON object of the headline figures as the last line.
Run: `.venv/bin/python benchmarks/calm.py [--sweep]` (`--small` for a quick smoke run).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import common

TITLE = "CALM training step vs CALM-pytorch"
SMALL = dict(anchor_dim=64, anchor_layers=4, anchor_heads=4, aug_dim=32, aug_layers=4, aug_heads=2, vocab=128, batch=4,
             seq=32, steps=2, runs=2)


def main(argv=None):
  ap = common.parser(__doc__, runs=5)
  ap.add_argument("--anchor-dim", type=int, default=512)
  ap.add_argument("--anchor-layers", type=int, default=8)
  ap.add_argument("--anchor-heads", type=int, default=8)
  ap.add_argument("--aug-dim", type=int, default=256)
  ap.add_argument("--aug-layers", type=int, default=8)
  ap.add_argument("--aug-heads", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
  ap.add_argument("--sweep", action="store_true",
                  help="also run the SWEEP sizes (smaller models, a longer sequence): one row each")
  common.add_alone(ap)
  args = common.parse(ap, argv, small=SMALL)

  machine = common.Machine("jax", "torch", "CALM-pytorch")
  if args.alone != "ours":
    machine.torch_all_cores()
  sizes = [args] + ([argparse.Namespace(**{**vars(args), **s}) for s in SWEEP] if args.sweep else [])
  if args.alone:
    common.report(args, [_measure_alone(a, args.alone) for a in sizes])
    return

  import jax

  peaks = _matmul_peaks()
  rows = [_measure(a) for a in sizes]
  alone = _each_side_alone(args, rows)
  machine.done()
  main_row = rows[0]
  result = {"steps_per_s_ours": round(1 / main_row["ours"], 3),
            "steps_per_s_calm_pytorch": round(1 / main_row["theirs"], 3),
            "speedup_vs_calm_pytorch": round(main_row["theirs"] / main_row["ours"], 2),
            "compile_s_ours": round(main_row["compile_s"], 2), "gflop_per_step": round(main_row["flops"] / 1e9, 1)}
  if len(rows) > 1:
    result["speedup_sweep"] = [round(r["theirs"] / r["ours"], 2) for r in rows[1:]]
  dev = jax.devices()[0]
  if dev.platform == "gpu":
    peak = _peak_flops(dev)
    if peak:
      result["mfu_ours"] = round(main_row["flops"] / main_row["ours"] / peak, 4)
  print(f"fp32 matmul peak (1024x512 @ 512x2048): XLA {peaks[0]:.0f} GFLOP/s, torch {peaks[1]:.0f} GFLOP/s")
  machine.print_load()
  common.report(args, result, lambda: _write(result, rows, machine, peaks, alone))


# Further sizes for --sweep (overrides of the defaults): smaller models, where per-operation overhead
# weighs more, and a longer sequence at a smaller batch, where attention does.
SWEEP = [
    dict(anchor_dim=128, anchor_layers=4, anchor_heads=4, aug_dim=64, aug_layers=4, aug_heads=2, seq=64),
    dict(anchor_dim=256, anchor_layers=8, anchor_heads=4, aug_dim=128, aug_layers=8, aug_heads=2),
    dict(batch=2, seq=512),
]


def step_flops(a) -> float:
  """Matmul FLOPs of one training step, counted from the shapes (XLA's cost analysis counts a
  scanned layer once): the frozen m_A forward, the anchor forward with the cross-attentions,
  activation gradients back through the anchor from its first connection (layer 1) up, and the
  composition's activation and weight gradients (2x its forward). Attention scores and values are
  counted unmasked; m_A's unused LM head is not counted."""
  tok, t = a.batch * a.seq, a.seq

  def layer(d):  # q, k, v, o; SwiGLU 4x (three d x 4d matrices); QK^T and AV
    return 2 * tok * (4 * d * d + 3 * d * 4 * d) + 4 * tok * t * d

  n = max(1, a.aug_layers // 4)
  head = 2 * tok * a.anchor_dim * a.vocab
  xattn = n * (2 * tok * (a.aug_dim * a.anchor_dim + 4 * a.anchor_dim ** 2) + 4 * tok * t * a.anchor_dim)
  forward = a.anchor_layers * layer(a.anchor_dim) + head + a.aug_layers * layer(a.aug_dim) + xattn
  backward = (a.anchor_layers - 1) * layer(a.anchor_dim) + head + 2 * xattn
  return float(forward + backward)


def _matmul_peaks(m=1024, k=512, n=2048, reps=50) -> tuple[float, float]:
  """GFLOP/s of one fp32 matmul of the model's typical shape, XLA and torch (what a step can reach)."""
  import jax
  import jax.numpy as jnp
  import torch
  x, y = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
  f = jax.jit(jnp.dot)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  out = []
  for mm in (lambda: f(xj, yj).block_until_ready(), lambda: torch.from_numpy(x) @ torch.from_numpy(y)):
    for _ in range(10):
      mm()
    t0 = time.perf_counter()
    for _ in range(reps):
      mm()
    out.append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
  return out[0], out[1]


def _each_side_alone(args, rows) -> common.Alone:
  """Each side again in a process of its own (`common.each_alone`): ours under TUNED (as `launch.train`
  runs it), CALM-pytorch under glibc's default allocator (as its users run it). Each row's `ours` /
  `theirs` becomes the faster of that side's two medians (`*_shared` and `*_alone` kept)."""
  from calm_jax.malloc import TUNED
  base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"CALM_JAX_NO_REEXEC": "1"}
  alone = common.each_alone(args, {"ours": base | {"GLIBC_TUNABLES": TUNED}, "theirs": base})
  for side in common.SIDES:
    for row, t in zip(rows, alone[side] or ()):
      row[f"{side}_shared"], row[f"{side}_alone"] = row[side], t
      row[side] = common.faster(row[side], t)
  for row in rows if alone.runs else ():
    print(f"  alone in its own process: ours {row['ours_alone'] * 1e3:.1f} ms/step, CALM-pytorch (glibc defaults) "
          f"{row['theirs_alone'] * 1e3:.1f}; speedup, the faster figure of each side: "
          f"{row['theirs'] / row['ours']:.2f}x")
  return alone


def _time_sides(args, sides) -> tuple[dict, dict]:
  """Builds the sides at one size on the same token batch and times them alternately in blocks of
  args.steps, after two warm-up blocks each (compiled, the allocator's heap grown to its steady size).
  Returns ({side: seconds per step of each block}, {side: (run, #trainable, compile s)})."""
  rng = np.random.default_rng(0)
  seq = rng.integers(1, args.vocab, (args.batch, args.seq + 1)).astype(np.int64)
  built = {side: (_ours if side == "ours" else _theirs)(args, seq) for side in sides}
  blocks = {side: lambda run=built[side][0]: run(args.steps) for side in sides}
  return common.alternate(blocks, args.runs, warmup=2, per=args.steps), built


def _measure_alone(args, side: str) -> float:
  """One side alone: median seconds per step over args.runs blocks."""
  return common.medians(_time_sides(args, (side,))[0])[side]


def _measure(args) -> dict:
  """Both sides at one size, timed alternately; medians over args.runs blocks."""
  times, built = _time_sides(args, ("ours", "theirs"))
  med = common.medians(times)
  row = dict(args=args, n_ours=built["ours"][1], n_theirs=built["theirs"][1], t_ours=times["ours"],
             t_theirs=times["theirs"], ours=med["ours"], theirs=med["theirs"], compile_s=built["ours"][2],
             flops=step_flops(args))
  print(f"anchor {args.anchor_dim}x{args.anchor_layers} ({args.anchor_heads} heads), augment {args.aug_dim}x"
        f"{args.aug_layers} ({args.aug_heads} heads), vocab {args.vocab}, batch {args.batch}, seq {args.seq}; "
        f"trainable params ours {row['n_ours']:,} / CALM-pytorch {row['n_theirs']:,}; "
        f"{row['flops'] / 1e9:.1f} GFLOP/step")
  print(f"  ours: median {row['ours'] * 1e3:.1f} ms/step of {common.ms(times['ours'])} "
        f"(compile {row['compile_s']:.1f}s, {row['flops'] / row['ours'] / 1e9:.0f} GFLOP/s)")
  print(f"  CALM-pytorch: median {row['theirs'] * 1e3:.1f} ms/step of {common.ms(times['theirs'])} "
        f"({row['flops'] / row['theirs'] / 1e9:.0f} GFLOP/s); speedup {row['theirs'] / row['ours']:.2f}x", flush=True)
  return row


def _ours(args, seq):
  """A jitted training step over the composition parameters; returns (run(n), #trainable, compile s)."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax
  from flax import nnx

  from calm import Composed
  from calm_jax.models import Decoder, DecoderConfig, init_params
  from calm_jax.train import lm_loss
  from calm_jax.train.optim import make_optimizer
  from calm_jax.train.trainer import split_trainable, trainable_filter
  from calm_jax.variables import ComposeParam
  from configs.common import add_common

  def cfg(dim, layers, heads):
    return DecoderConfig.make(model_type="llama", vocab_size=args.vocab, hidden_size=dim, intermediate_size=4 * dim,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                              max_position_embeddings=max(args.seq, 64))

  anchor_cfg, aug_cfg = cfg(args.anchor_dim, args.anchor_layers, args.anchor_heads), cfg(args.aug_dim, args.aug_layers,
                                                                                          args.aug_heads)
  model = Composed(Decoder(anchor_cfg, params=init_params(anchor_cfg, 0)),
                   [Decoder(aug_cfg, params=init_params(aug_cfg, 1))])
  graphdef, trainable, frozen = split_trainable(model, trainable_filter(ComposeParam))
  opt = add_common(ml_collections.ConfigDict(), steps=1000, batch_size=args.batch).optimizer
  opt.update(name="adamw", lr=1e-4, weight_decay=0.01, clip_norm=1.0, schedule="constant")
  tx = make_optimizer(opt, 1000)
  opt_state = tx.init(trainable)
  tokens, targets = jnp.asarray(seq[:, :-1], jnp.int32), jnp.asarray(seq[:, 1:], jnp.int32)
  mask = jnp.ones(tokens.shape, jnp.float32)

  @jax.jit
  def step(trainable, opt_state, frozen):
    def loss_of(tr):
      return lm_loss(nnx.merge(graphdef, tr, frozen)(tokens), targets, mask)

    (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  t0 = time.perf_counter()
  compiled = step.lower(trainable, opt_state, frozen).compile()
  compile_s = time.perf_counter() - t0
  state = {"t": trainable, "o": opt_state}

  def run(n):
    for _ in range(n):
      state["t"], state["o"], loss = compiled(state["t"], state["o"], frozen)
    loss.block_until_ready()

  n = sum(x.size for x in jax.tree.leaves(trainable))
  return run, n, compile_s


def _theirs(args, seq):
  """CALM-pytorch's training step at the same sizes; returns (run(n), #trainable, 0: nothing compiles)."""
  import torch
  from CALM_pytorch import AugmentParams, CALM
  from x_transformers import Decoder as XDecoder
  from x_transformers import TransformerWrapper

  torch.manual_seed(0)

  def model(dim, layers, heads):
    return TransformerWrapper(num_tokens=args.vocab, max_seq_len=args.seq + 1,
                              attn_layers=XDecoder(dim=dim, depth=layers, heads=heads, attn_dim_head=dim // heads,
                                                   rotary_pos_emb=True, ff_glu=True, ff_swish=True, use_rmsnorm=True,
                                                   ff_mult=4))

  anchor, aug = model(args.anchor_dim, args.anchor_layers, args.anchor_heads), model(args.aug_dim, args.aug_layers,
                                                                                   args.aug_heads)
  calm = CALM(anchor, AugmentParams(model=aug, connect_every_num_layers=4),
              attn_kwargs=dict(linear_project_context=True, pre_rmsnorm=True, flash=True, heads=args.anchor_heads,
                               dim_head=args.anchor_dim // args.anchor_heads))
  params = [p for p in calm.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
  seq_t = torch.as_tensor(seq)
  prompt = seq_t[:, :-1]

  def run(n):
    for _ in range(n):
      loss = calm(seq_t, prompt=prompt)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad()

  return run, sum(p.numel() for p in params), 0.0


def _peak_flops(dev) -> float | None:
  kind = dev.device_kind.lower()
  for name, peak in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12)):  # dense bf16/tf32-class peaks
    if name in kind:
      return peak
  return None


COLUMNS = ["anchor / m_A (width x layers)", "batch x seq", "trainable params ours / theirs", "GFLOP/step",
           "ours ms/step, shared process (min)", "ours, alone", "CALM-pytorch ms/step, shared process (min)",
           "CALM-pytorch, alone (glibc defaults)", "GFLOP/s ours / theirs (faster)",
           "speedup, the faster figure of each side"]


def _row_cells(r) -> list[str]:
  """One size's cells under COLUMNS."""
  x = r["args"]

  def shared(side):
    return f"{r.get(side + '_shared', r[side]) * 1e3:.1f} ({min(r['t_' + side]) * 1e3:.1f})"

  def alone(side):
    return f"{r[side + '_alone'] * 1e3:.1f}" if side + "_alone" in r else "-"

  return [f"{x.anchor_dim}x{x.anchor_layers} / {x.aug_dim}x{x.aug_layers}", f"{x.batch} x {x.seq}",
          f"{r['n_ours']:,} / {r['n_theirs']:,}", f"{r['flops'] / 1e9:.1f}", shared("ours"), alone("ours"),
          shared("theirs"), alone("theirs"),
          f"{r['flops'] / r['ours'] / 1e9:.0f} / {r['flops'] / r['theirs'] / 1e9:.0f}",
          f"**{r['theirs'] / r['ours']:.2f}x**"]


def _write(result, rows, machine, peaks, alone):
  from calm_jax.malloc import is_tuned
  a = rows[0]["args"]
  sweep = f"; other sizes {', '.join(f'{x}x' for x in result['speedup_sweep'])}" if "speedup_sweep" in result else ""
  ratio = (f"**{result['speedup_vs_calm_pytorch']}x** CALM-pytorch's steps/s (training step, anchor "
           f"{a.anchor_dim}x{a.anchor_layers}, m_A {a.aug_dim}x{a.aug_layers}, batch {a.batch} x {a.seq}, fp32; "
           f"each side's faster of shared / alone process){sweep}")
  common.write_run(TITLE, f"""
{machine.line()}
- fp32 matmul 1024x512 @ 512x2048: XLA {peaks[0]:.0f} GFLOP/s, torch {peaks[1]:.0f} GFLOP/s
- both sides: pre-RMSNorm rotary SwiGLU (4x) decoders, vocab {a.vocab}, fp32; m_A's every 4th layer
  into evenly spaced anchor layers from layer 1 (N_A / 4 connections, the anchor's heads); one step =
  frozen m_A forward, anchor + cross-attention forward, next-token loss, backward into the composition
  only, AdamW; median (min) of {a.runs} blocks of {a.steps} steps, the two sides alternating, after two
  warm-up blocks each; one process, under glibc tunables {'`calm_jax.malloc.TUNED`' if is_tuned() else 'as started'}
- GFLOP/step: matmul FLOPs counted from the shapes (`step_flops`), the same work on both sides
{alone.line("ours under TUNED, CALM-pytorch under glibc's default allocator, as their users run them")}
- code: {common.code_version()}; command: `{common.command()}`

{common.md_table(COLUMNS, [_row_cells(r) for r in rows])}
""", ratio, machine)


if __name__ == "__main__":
  from calm_jax.malloc import reexec_tuned
  reexec_tuned()
  main()
