"""SVD of every SVF target matrix: ours (`svf.decompose`: jit, vmapped over stacked layers, matrices of
one shape in one call, fp32) vs `torch.linalg.svd` called matrix by matrix (the official Transformer²
code's way), same matrices, same precision (fp32), one run each.

A random llama-shaped model (default ~134M parameters: hidden 768, 12 layers, intermediate 2048,
vocab 32000, 12 heads) is drawn with numpy; torch gets the same matrices in its [out, in] layout.
Our first call (with compile; compile time reported) is followed by one timed warm run, for both
algorithms (`lapack`: gesdd, the default; `gram`: eigh of WᵀW, see svf/decompose.py); torch runs
once after a one-matrix warm-up. Both sides are checked: max |U·diag(σ)·Vᵀ − W| and singular
values against each other. torch uses `torch.set_num_threads(os.cpu_count())`. Each side is then
timed again alone, in a process of its own that imports only its side's library (the torch side
reads the matrices from a file; `common.each_alone`; `--no-alone` skips it); each figure in the
headline is the faster of the two.

Adds the run to docs/benchmarks.md (its section, and its row of the summary table; `common.write_run`)
and prints one JSON object of the headline figures as the last line.
Run: `.venv/bin/python benchmarks/svd.py` (`--small` for a quick smoke run; `--targets mlp|attention|both`).
"""
from __future__ import annotations

import numpy as np

import common

TITLE = "SVD of the SVF target matrices vs a `torch.linalg.svd` loop"
MODEL = dict(hidden=768, layers=12, heads=12, intermediate=2048, vocab=32000)
# The timed figures (seconds) and the side each belongs to: lapack warm, its first call, gram warm; the torch loop.
SIDE_OF = {"ours_s": "ours", "first_s": "ours", "gram_s": "ours", "torch_s": "theirs"}


def main(argv=None):
  ap = common.parser(__doc__, model=MODEL)
  ap.add_argument("--kv-heads", type=int, default=12)
  ap.add_argument("--targets", default="both", help="mlp (official code's adapted set) | attention | both")
  common.add_alone(ap)
  args = common.parse(ap, argv, small={**common.SMALL_MODEL, "kv_heads": 4})

  machine = common.Machine("jax", "torch")
  if args.alone != "ours":
    machine.torch_all_cores()
  if args.alone == "theirs":
    common.report(args, _time_torch(_torch_mats(np.load(common.scratch(args) / "mats.npz").values()))[1])
    return

  import jax
  import jax.numpy as jnp

  from calm_jax.models import DecoderConfig, init_params, param_specs
  from svf.decompose import as_matrix, decompose, reconstruct, select_targets

  cfg = DecoderConfig.make(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                           intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
  n_params = sum(int(np.prod(s.shape)) for s in param_specs(cfg).values())
  params = init_params(cfg, 0, std=0.02)
  if not args.alone:
    names = select_targets([f"layers/{k}" for k in params["layers"]], args.targets)
    mats = {n: np.asarray(as_matrix(n, params["layers"][n.split("/")[1]])) for n in names}
    torch_mats = _torch_mats(mats.values())
    n_mats, n_elems = len(torch_mats), sum(m.numel() for m in torch_mats)

  def ours_svd(algorithm="lapack"):
    return jax.block_until_ready(decompose(params, args.targets, algorithm=algorithm))

  compile_time = common.CompileTime()
  _, first_s = common.timed(ours_svd)
  compile_s = compile_time.seconds
  ours, ours_s = common.timed(ours_svd)
  ours_svd("gram")  # compile
  gram, gram_s = common.timed(lambda: ours_svd("gram"))
  shared = {"ours_s": ours_s, "first_s": first_s, "gram_s": gram_s}
  if args.alone:
    common.report(args, shared)
    return

  import torch

  theirs, torch_figures = _time_torch(torch_mats)
  shared.update(torch_figures)
  if not args.no_alone:  # what the torch side's own process reads (it has no JAX to draw them)
    np.savez(common.scratch(args) / "mats.npz", *mats.values())
  alone = common.each_alone(args)
  machine.done()
  alone_s = {k: alone.get(SIDE_OF[k], k) for k in shared}
  fast = {k: common.faster(v, alone_s[k]) for k, v in shared.items()}

  def recon_err(factors):
    return max(float(jnp.max(jnp.abs(reconstruct(f) - mats[n]))) for n, f in factors.items())

  def sv_diff(factors):
    return float(np.max(np.abs(np.concatenate([np.asarray(factors[n].s).reshape(-1) for n in names]) - s_torch)))

  s_torch = np.concatenate([s.numpy() for _, s, _ in theirs])
  err_torch = max(float((u @ torch.diag(s) @ vh - w).abs().max()) for (u, s, vh), w in zip(theirs, torch_mats))
  result = {"speedup_vs_torch": round(fast["torch_s"] / fast["ours_s"], 2),
            "speedup_vs_torch_with_compile": round(fast["torch_s"] / fast["first_s"], 2),
            "ours_s": round(fast["ours_s"], 3), "torch_s": round(fast["torch_s"], 3),
            "compile_s_ours": round(compile_s, 2),
            "matrices": n_mats, "max_recon_err_ours": recon_err(ours), "max_recon_err_torch": err_torch,
            "max_singular_value_diff": sv_diff(ours), "gram_s": round(fast["gram_s"], 3),
            "speedup_vs_torch_gram": round(fast["torch_s"] / fast["gram_s"], 2), "max_recon_err_gram": recon_err(gram),
            "max_singular_value_diff_gram": sv_diff(gram)}
  for k in SIDE_OF:
    result[f"{k}_shared"], result[f"{k}_alone"] = round(shared[k], 3), alone_s[k] and round(alone_s[k], 3)
  print(f"model {n_params / 1e6:.1f}M params; targets {args.targets}: {n_mats} matrices, {n_elems / 1e6:.1f}M "
        f"elements, fp32, {machine.ncpu} CPUs (torch threads {machine.torch_threads}), jax devices {jax.devices()}")

  def also(k):
    return "" if alone_s[k] is None else f"; alone in its own process {alone_s[k]:.3f}s"

  print(f"ours: {ours_s:.3f}s warm (first call {first_s:.3f}s, of which compile {compile_s:.2f}s){also('ours_s')}")
  print(f"ours, algorithm='gram' (eigh of WᵀW): {gram_s:.3f}s warm{also('gram_s')}")
  print(f"torch.linalg.svd loop: {shared['torch_s']:.3f}s{also('torch_s')}")
  print(f"gram: max reconstruction error {result['max_recon_err_gram']:.2e}; max |σ_gram − σ_torch| "
        f"{result['max_singular_value_diff_gram']:.2e}")
  print(f"max reconstruction error ours {result['max_recon_err_ours']:.2e}, torch {err_torch:.2e}; "
        f"max |σ_ours − σ_torch| {result['max_singular_value_diff']:.2e}")
  machine.print_load()

  def write():
    ratio = (f"**{result['speedup_vs_torch']}x** (default `lapack`) and **{result['speedup_vs_torch_gram']}x** "
             f"(`gram`) the speed of a `torch.linalg.svd` loop, warm ({n_mats} matrices, fp32; each side's faster of "
             "shared / alone process)")

    def row(name, k, err, first=""):
      return [name, f"{shared[k]:.3f}{first}", common.cell(alone_s[k], ".3f"), f"{result[err]:.1e}"]

    table = common.md_table(["", "CPU s, shared process", "CPU s, alone", "max recon. error"], [
        row('ours, `algorithm="lapack"` (default; gesdd, jit, vmapped over stacked layers)', "ours_s",
            "max_recon_err_ours", f" (first call {first_s:.3f}, compile {result['compile_s_ours']})"),
        row('ours, `algorithm="gram"` (eigh of WᵀW, jit, vmapped)', "gram_s", "max_recon_err_gram"),
        row("`torch.linalg.svd` loop", "torch_s", "max_recon_err_torch")])
    common.write_run(TITLE, f"""
{machine.line()}
- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, intermediate
  {args.intermediate}, vocab {args.vocab}); targets `{args.targets}`: {n_mats} matrices, {n_elems / 1e6:.1f}M elements,
  fp32
- one run each; ours = `svf.decompose.decompose` after a first (compiling) call, torch = one
  `torch.linalg.svd(W, full_matrices=False)` per matrix after a one-matrix warm-up; both in one process
{alone.line()}
- code: {common.code_version()}; command: `{common.command()}`

{table}

speedup vs torch: **{result['speedup_vs_torch']}x** (lapack) and **{result['speedup_vs_torch_gram']}x** (gram) warm,
{result['speedup_vs_torch_with_compile']}x including the lapack path's compile; max |σ − σ_torch|
{result['max_singular_value_diff']:.1e} (lapack), {result['max_singular_value_diff_gram']:.1e} (gram).
Goal: ≥ 1.5× on CPU.
""", ratio, machine)

  common.report(args, result, write)


def _torch_mats(mats):
  """The torch side's matrices one by one, in HF's [out, in] layout (= our stacked [layer, in, out] transposed)."""
  import torch
  return [torch.from_numpy(np.ascontiguousarray(w[l].T)) for w in mats for l in range(w.shape[0])]


def _time_torch(torch_mats):
  """A one-matrix warm-up (LAPACK workspace, threads), then one timed `torch.linalg.svd` loop over all.
  Returns (the factors, {"torch_s": its seconds})."""
  import torch
  torch.linalg.svd(torch_mats[0], full_matrices=False)
  theirs, torch_s = common.timed(lambda: [torch.linalg.svd(w, full_matrices=False) for w in torch_mats])
  return theirs, {"torch_s": torch_s}


if __name__ == "__main__":
  main()
