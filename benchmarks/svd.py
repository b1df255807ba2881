"""SVD of every SVF target matrix: ours (`svf.decompose`: jit, vmapped over stacked layers, matrices of
one shape in one call, fp32) vs `torch.linalg.svd` called matrix by matrix (the official Transformer²
code's way), same matrices, same precision (fp32), one run each.

A random llama-shaped model (default ~134M parameters: hidden 768, 12 layers, intermediate 2048,
vocab 32000, 12 heads) is drawn with numpy; torch gets the same matrices in its [out, in] layout.
Our first call (with compile; compile time reported) is followed by one timed warm run, for both
algorithms (`lapack`: gesdd, the default; `gram`: eigh of WᵀW, see svf/decompose.py); torch runs
once after a one-matrix warm-up. Both sides are checked: max |U·diag(σ)·Vᵀ − W| and singular
values against each other. torch uses `torch.set_num_threads(os.cpu_count())`.

Appends a section to docs/benchmarks.md and prints one JSON object as the last line.
Run: `.venv/bin/python benchmarks/svd.py` (`--small` for a quick smoke run; `--targets mlp|attention|both`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
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
  ap.add_argument("--kv-heads", type=int, default=12)
  ap.add_argument("--intermediate", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--targets", default="both", help="mlp (official code's adapted set) | attention | both")
  ap.add_argument("--small", action="store_true", help="tiny sizes, for a smoke test")
  ap.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
  args = ap.parse_args(argv)
  if args.small:
    args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab = 64, 2, 4, 4, 128, 512

  import jax
  import jax.numpy as jnp
  import torch

  from calm_jax.models import DecoderConfig, init_params, param_specs
  from svf.decompose import as_matrix, decompose, reconstruct, select_targets

  ncpu = os.cpu_count() or 1
  torch.set_num_threads(ncpu)
  cfg = DecoderConfig.make(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                           intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
  n_params = sum(int(np.prod(s.shape)) for s in param_specs(cfg).values())
  params = init_params(cfg, 0, std=0.02)
  names = select_targets([f"layers/{k}" for k in params["layers"]], args.targets)
  mats = {n: np.asarray(as_matrix(n, params["layers"][n.split("/")[1]])) for n in names}
  # torch side: the same matrices one by one, in HF's [out, in] layout (= our [in, out] transposed)
  torch_mats = [torch.from_numpy(np.ascontiguousarray(w[l].T)) for w in mats.values() for l in range(w.shape[0])]
  n_mats, n_elems = len(torch_mats), sum(m.numel() for m in torch_mats)

  compile_events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **_: compile_events.append(secs) if name.startswith("/jax/core/compile/") else None)
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  ours = jax.block_until_ready(decompose(params, args.targets))
  first_s = time.perf_counter() - t0
  compile_s = sum(compile_events)
  t0 = time.perf_counter()
  ours = jax.block_until_ready(decompose(params, args.targets))
  ours_s = time.perf_counter() - t0

  jax.block_until_ready(decompose(params, args.targets, algorithm="gram"))  # compile
  t0 = time.perf_counter()
  gram = jax.block_until_ready(decompose(params, args.targets, algorithm="gram"))
  gram_s = time.perf_counter() - t0

  torch.linalg.svd(torch_mats[0], full_matrices=False)  # warm-up (LAPACK workspace, threads)
  t0 = time.perf_counter()
  theirs = [torch.linalg.svd(w, full_matrices=False) for w in torch_mats]
  torch_s = time.perf_counter() - t0
  load = (load_before, os.getloadavg()[0])

  err_ours = max(float(jnp.max(jnp.abs(reconstruct(f) - mats[n]))) for n, f in ours.items())
  err_torch = max(float((u @ torch.diag(s) @ vh - w).abs().max()) for (u, s, vh), w in zip(theirs, torch_mats))
  s_ours = np.concatenate([np.asarray(ours[n].s).reshape(-1) for n in names])
  s_torch = np.concatenate([s.numpy() for _, s, _ in theirs])
  sv_diff = float(np.max(np.abs(s_ours - s_torch)))
  err_gram = max(float(jnp.max(jnp.abs(reconstruct(f) - mats[n]))) for n, f in gram.items())
  s_gram = np.concatenate([np.asarray(gram[n].s).reshape(-1) for n in names])
  sv_diff_gram = float(np.max(np.abs(s_gram - s_torch)))

  result = {"speedup_vs_torch": round(torch_s / ours_s, 2), "speedup_vs_torch_with_compile": round(torch_s / first_s, 2),
            "ours_s": round(ours_s, 3), "torch_s": round(torch_s, 3), "compile_s_ours": round(compile_s, 2),
            "matrices": n_mats, "max_recon_err_ours": err_ours, "max_recon_err_torch": err_torch,
            "max_singular_value_diff": sv_diff, "gram_s": round(gram_s, 3),
            "speedup_vs_torch_gram": round(torch_s / gram_s, 2), "max_recon_err_gram": err_gram,
            "max_singular_value_diff_gram": sv_diff_gram}
  print(f"model {n_params / 1e6:.1f}M params; targets {args.targets}: {n_mats} matrices, {n_elems / 1e6:.1f}M "
        f"elements, fp32, {ncpu} CPUs (torch threads {torch.get_num_threads()}), jax devices {jax.devices()}")
  print(f"ours: {ours_s:.3f}s warm (first call {first_s:.3f}s, of which compile {compile_s:.2f}s)")
  print(f"ours, algorithm='gram' (eigh of WᵀW): {gram_s:.3f}s warm")
  print(f"torch.linalg.svd loop: {torch_s:.3f}s")
  print(f"gram: max reconstruction error {err_gram:.2e}; max |σ_gram − σ_torch| {sv_diff_gram:.2e}")
  print(f"max reconstruction error ours {err_ours:.2e}, torch {err_torch:.2e}; max |σ_ours − σ_torch| {sv_diff:.2e}")
  print(f"1-min load average before/after: {load[0]:.1f} / {load[1]:.1f}")
  if not args.no_write and not args.small:
    _append(result, args, n_params, n_mats, n_elems, ncpu, first_s, load, jax.__version__, torch.__version__)
  print(json.dumps(result))


def _append(result, args, n_params, n_mats, n_elems, ncpu, first_s, load, jax_v, torch_v):
  path = ROOT / "docs" / "benchmarks.md"
  if not path.exists():
    path.write_text("# Benchmarks\n\nSide-by-side runs against the peer tools, one section per run; ratios matter, "
                    "absolute times depend on the machine.\n")
  cmd = "python benchmarks/svd.py " + " ".join(sys.argv[1:])
  date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  text = f"""
## SVD of the SVF target matrices vs a `torch.linalg.svd` loop ({date})

- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, {ncpu} CPUs; jax {jax_v},
  torch {torch_v} (`torch.set_num_threads({ncpu})`); 1-min load average before/after {load[0]:.1f} / {load[1]:.1f}
- model: random llama, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, intermediate
  {args.intermediate}, vocab {args.vocab}); targets `{args.targets}`: {n_mats} matrices, {n_elems / 1e6:.1f}M elements, fp32
- one run each; ours = `svf.decompose.decompose` after a first (compiling) call, torch = one
  `torch.linalg.svd(W, full_matrices=False)` per matrix after a one-matrix warm-up
- command: `{cmd.strip()}`

| | CPU s | max recon. error |
| --- | --- | --- |
| ours, `algorithm="lapack"` (default; gesdd, jit, vmapped over stacked layers) | {result['ours_s']} (first call {first_s:.3f}, compile {result['compile_s_ours']}) | {result['max_recon_err_ours']:.1e} |
| ours, `algorithm="gram"` (eigh of WᵀW, jit, vmapped) | {result['gram_s']} | {result['max_recon_err_gram']:.1e} |
| `torch.linalg.svd` loop | {result['torch_s']} | {result['max_recon_err_torch']:.1e} |

speedup vs torch: **{result['speedup_vs_torch']}x** (lapack) and **{result['speedup_vs_torch_gram']}x** (gram) warm,
{result['speedup_vs_torch_with_compile']}x including the lapack path's compile; max |σ − σ_torch| {result['max_singular_value_diff']:.1e}
(lapack), {result['max_singular_value_diff_gram']:.1e} (gram). Goal (issue 5): ≥ 1.5× on CPU. GPU column: not
measured (this run had no GPU).
"""
  with open(path, "a") as f:
    f.write(text)


if __name__ == "__main__":
  main()
