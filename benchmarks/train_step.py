"""LoRA and SVF training steps on a real model: ours (jitted) vs peft + transformers (PyTorch).

Both sides train the same checkpoint (default SmolLM2-135M-Instruct, fetched by `launch.fetch`) in fp32
on the same batch of token ids (`--batch` x `--seq` inputs, next-token loss on every token), with the
same optimizer: AdamW (lr, betas, eps, decoupled weight decay) after global-norm clipping.

- LoRA (rank 16, alpha 32, q, k, v, o, gate, up, down): ours is `calm_jax.lora.LoRAModel` (the frozen
  base plus `LoRAParam` factors); theirs is `peft.get_peft_model` with a `LoraConfig` on the same
  modules. Both start from the same factors: A as our `init_lora` draws it, and B random (not peft's 0,
  so that the first loss depends on the adapter), handed to peft through our PEFT export
  (`calm_jax.peft_format.save_peft`).
- SVF (Transformer², the MLP matrices gate / up / down): ours is `svf.model.SVFModel` on the SVD of
  `svf.decompose`; theirs is `TorchSVF` below, the same parametrisation written in PyTorch as the
  official code composes it: U, σ, Vᵀ from `torch.linalg.svd` of each MLP weight, W' = U diag(σ⊙m) Vᵀ
  (Σσ / Σσ⊙m), m = sigmoid(z), only z trainable, W' swapped into the transformers model by
  `torch.func.functional_call`. Both start from the same z, 0.1 plus smooth random waves along the
  spectrum (`smooth_z`: W' != W, yet defined alike by both SVDs).

Our step is the core trainer's jitted step (`calm_jax.train.trainer`: value_and_grad of the trainable
split only, the optax chain of `train.optim.make_optimizer`, state donated, grad norm and non-finite
count computed); theirs is forward, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`,
`zero_grad()`. The trainable parameter counts of the two sides are printed and must be equal; the first
step's loss (same weights, same batch) must agree to `LOSS_RTOL` relative, or the run fails; the second
step's loss (after one update: gradients, clipping and AdamW) is printed beside it.

Timing: our step is compiled first (its compile seconds reported apart), then `--warmup` steps of each
side, then `--steps` timed steps, the sides alternating step by step; tokens/s = batch x seq / the
median step time. torch uses `torch.set_num_threads(os.cpu_count())`, XLA its default. The process
re-executes itself under `calm_jax.malloc.TUNED` (the allocator `launch.train` runs under); each side is
then timed again alone in its own process (ours under TUNED, theirs under glibc's defaults, as their users
run them; `--no-alone` skips it), and each side's headline figure is the faster of its two medians.

`--write` adds the run to docs/benchmarks.md (`common.write_run`); the last stdout line is one JSON object
of the headline figures. `--small` runs a tiny random llama instead (a smoke run; never written).
Run: `.venv/bin/python benchmarks/train_step.py [--methods=lora,svf] [--write]` (minutes: each side is timed
twice, in the shared process and alone, and each SVF side first decomposes the model's MLP matrices).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

import common

TITLE = "LoRA and SVF training steps vs peft + transformers"
METHODS = ("lora", "svf")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SVF_TARGETS = ("gate", "up", "down")
# = calm_jax.peft_format.HF_MODULES, copied: the peer's own process (--alone=theirs) must not import JAX
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LOSS_RTOL = 1e-4  # first-step loss, ours vs the peer (same weights, same batch)
LORA_B_STD = 0.02  # B drawn random (not 0) so that the first loss exercises the adapter on both sides
SVF_Z_AMPLITUDE = 0.7  # z = 0.1 + smooth random waves along the spectrum (`smooth_z`): W' != W on both sides
SMALL = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512, batch=2, seq=32, steps=2, warmup=2)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="smollm2-135m-instruct", help="a `launch.fetch` name or an HF directory")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128, help="input tokens per row (the loss is on every one)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per side (the median is reported)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (>= 2: the loss checks)")
  ap.add_argument("--methods", default="lora,svf", help="comma-separated: lora, svf")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--alpha", type=float, default=32.0)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--b1", type=float, default=0.9)
  ap.add_argument("--b2", type=float, default=0.999)
  ap.add_argument("--eps", type=float, default=1e-8)
  ap.add_argument("--weight-decay", type=float, default=0.01)
  ap.add_argument("--clip-norm", type=float, default=1.0, help="global-norm clipping on both sides (0: none)")
  ap.add_argument("--write", action="store_true", help="add the run to docs/benchmarks.md")
  ap.add_argument("--small", action="store_true",
                  help="a tiny random llama (hidden 64, 2 layers), batch 2 x 32: a smoke run, nothing written")
  for name in ("hidden", "layers", "heads", "intermediate", "vocab"):  # the --small model's sizes
    ap.add_argument(f"--{name}", type=int, default=SMALL[name], help=argparse.SUPPRESS)
  common.add_alone(ap)
  return ap


def parse(argv=None) -> argparse.Namespace:
  args = parser().parse_args(argv)
  if args.small:
    vars(args).update({k: v for k, v in SMALL.items() if k not in ("hidden", "layers", "heads", "intermediate",
                                                                    "vocab")})
  args.no_write = not args.write  # common.report writes unless --small or no_write
  methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise SystemExit(f"--methods={args.methods!r}: unknown {bad or 'empty'}; choose from {', '.join(METHODS)}")
  args.methods = methods
  if args.warmup < 2:
    raise SystemExit(f"--warmup={args.warmup}: at least 2 (the first two steps' losses are the checks)")
  if min(args.batch, args.seq, args.steps, args.rank) < 1:
    raise SystemExit("--batch, --seq, --steps and --rank must be >= 1")
  return args


# ---------------------------------------------------------------------------------------- the inputs


def model_dir(args) -> Path:
  """The checkpoint both sides train: a fetched model, an HF directory, or (--small) a random llama
  saved into the scratch folder."""
  if args.small:
    import torch
    import transformers
    path = common.scratch(args) / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(common.llama_config(args, initializer_range=0.1)).save_pretrained(path)
    return path
  from calm_jax.fetch import MODELS, fetch
  return Path(fetch(args.model) if args.model in MODELS else args.model)


def make_inputs(path, out: Path, *, batch: int, seq: int, methods, rank: int, alpha: float, seed: int = 0) -> dict:
  """What both sides start from, written under `out` so that a side in its own process reads it without
  the other's library: `inputs.npz` (token ids [batch, seq + 1]; per method the starting trainable state
  in our layout: "lora/<target>/a|b", "svf/<target>") and, for LoRA, the same factors as a PEFT adapter
  (`out/peft`, by `calm_jax.peft_format.save_peft`). Returns the arrays."""
  from calm_jax import hf
  from calm_jax.lora import LoRASpec, init_lora
  from calm_jax.models.decoder import flatten
  from calm_jax.peft_format import save_peft

  cfg = hf.load_config(path)
  rng = np.random.default_rng(seed)
  arrays = {"tokens": rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int64)}
  if "lora" in methods:
    spec = LoRASpec.create(cfg, lora_regex(), rank=rank, alpha=alpha)
    lora = init_lora(cfg, spec, seed)
    lora = {n: {"a": np.asarray(f["a"]), "b": (LORA_B_STD * rng.standard_normal(f["b"].shape)).astype(np.float32)}
            for n, f in lora.items()}
    arrays.update({f"lora/{k}": v for k, v in flatten(lora).items()})
    save_peft(out / "peft", lora, spec, cfg, overwrite=True)
  if "svf" in methods:
    k = min(cfg.hidden_size, cfg.intermediate_size)
    for name in SVF_TARGETS:
      arrays[f"svf/{name}"] = smooth_z(rng, cfg.num_layers, k)
  np.savez(out / "inputs.npz", **arrays)
  return arrays


def smooth_z(rng, layers: int, k: int) -> np.ndarray:
  """z [layers, k] = 0.1 + three random low-frequency cosines along the spectrum (amplitude SVF_Z_AMPLITUDE).

  Singular vectors of near-equal σ (SmolLM2's MLP matrices have relative gaps down to 1e-5) are fixed only
  up to a rotation, which two SVD implementations resolve differently; W' agrees between them only where m
  is nearly equal across such neighbours. Measured on SmolLM2's down_proj: i.i.d. z ~ N(0.1, 1) made ours
  and torch's W' differ by ~1e-4 (the first loss by up to 2.7e-4), smooth z by ~3e-6, with W' 15-45% away
  from W either way."""
  t = np.linspace(0.0, 1.0, k)
  z = np.full((layers, k), 0.1)
  for j in (1, 2, 3):
    amp = rng.normal(0.0, SVF_Z_AMPLITUDE, (layers, 1))
    z += amp * np.cos(np.pi * j * t + rng.uniform(0.0, 2 * np.pi, (layers, 1)))
  return z.astype(np.float32)


def lora_regex() -> str:
  return f"layers/({'|'.join(LORA_TARGETS)})"


def svf_regex() -> str:
  return f"layers/({'|'.join(SVF_TARGETS)})"


def peft_names(targets=LORA_TARGETS) -> list[str]:
  """peft's `target_modules` for our target names."""
  return [HF_MODULES[t].split(".")[1] for t in targets]


@dataclasses.dataclass
class Side:
  """One side's training step on one method: `step()` runs one step to completion and returns the loss it
  computed (before its update), as a float."""
  step: Callable[[], float]
  n_trainable: int
  compile_s: float = 0.0  # ours: lower + compile of the step; theirs: nothing compiles
  setup_s: float = 0.0  # building the side (the SVD for SVF), not a training step


def optimizer_config(args):
  """Our optimizer block (configs/common.py's defaults) set to the benchmark's AdamW."""
  import ml_collections

  from configs.common import add_common
  opt = add_common(ml_collections.ConfigDict(), steps=1000, batch_size=args.batch).optimizer
  opt.update(name="adamw", lr=args.lr, schedule="constant", warmup_steps=0, weight_decay=args.weight_decay,
             clip_norm=args.clip_norm, b1=args.b1, b2=args.b2, eps=args.eps)
  return opt


# -------------------------------------------------------------------------------------------- ours


def ours(method: str, base, arrays: dict, args, svd_cache=None) -> Side:
  """Our side of `method` on the Decoder `base`: the model with its trainable Variable type, and the
  trainer's step over it."""
  import jax.numpy as jnp

  t0 = time.perf_counter()
  if method == "lora":
    from calm_jax.lora import LoRAModel, LoRASpec
    from calm_jax.variables import LoRAParam
    spec = LoRASpec.create(base.config, lora_regex(), rank=args.rank, alpha=args.alpha)
    lora = {n: {p: jnp.asarray(arrays[f"lora/{n}/{p}"]) for p in "ab"} for n in spec.targets}
    model, trainable = LoRAModel(base, spec, lora=lora), LoRAParam
  else:
    from calm_jax.variables import SVFParam
    from svf.decompose import cached_decompose
    from svf.model import SVFModel
    factors = cached_decompose(base.params(), svf_regex(), svd_cache)
    model = SVFModel(base, factors, f="sigmoid", zs={f"layers/{n}": arrays[f"svf/{n}"] for n in SVF_TARGETS})
    trainable = SVFParam
  setup_s = time.perf_counter() - t0
  return trainer_step(model, trainable, arrays["tokens"], args, setup_s)


def trainer_step(model, trainable_type, tokens: np.ndarray, args, setup_s: float = 0.0) -> Side:
  """The core trainer's step (`calm_jax.train.trainer.make_step`, on one device) for
  `model`'s `trainable_type`, next-token loss on every token (`lm_batch_loss`), compiled here."""
  import jax
  import jax.numpy as jnp

  from calm_jax.train import lm_batch_loss
  from calm_jax.train.optim import make_optimizer
  from calm_jax.train.trainer import make_step, split_trainable, trainable_filter

  graphdef, trainable, frozen = split_trainable(model, trainable_filter(trainable_type))
  tx = make_optimizer(optimizer_config(args), 1000)
  opt_state = jax.jit(tx.init)(trainable)
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
           "attention_mask": jnp.ones(tokens[:, :-1].shape, bool),
           "loss_mask": jnp.ones(tokens[:, :-1].shape, jnp.float32)}
  step_fn = make_step(graphdef, tx, lm_batch_loss)

  t0 = time.perf_counter()
  compiled = step_fn.lower(trainable, opt_state, frozen, batch, None).compile()
  compile_s = time.perf_counter() - t0
  state = {"trainable": trainable, "opt": opt_state}

  def step() -> float:
    state["trainable"], state["opt"], m = compiled(state["trainable"], state["opt"], frozen, batch, None)
    return float(m["loss"])  # waits for the step

  n = sum(x.size for x in jax.tree.leaves(trainable))
  return Side(step, int(n), compile_s, setup_s)


# ------------------------------------------------------------------------------------------- theirs


class TorchSVF:
  """SVF on a transformers model, in PyTorch (the peer of `svf.model.SVFModel`).

  Per target linear (weight [out, in]) of every layer: U, σ, Vᵀ = torch.linalg.svd(W) once, in fp32 (batched
  over the layers); W' = U diag(σ⊙m) Vᵀ (Σσ / Σσ⊙m) with m = sigmoid(z), as Transformer²'s official code
  composes it; only z ([layers, k] per target) requires grad. `logits(ids, mask)` runs the model with every
  W' in place of W (`torch.func.functional_call`), so autograd reaches z through W'.
  """

  def __init__(self, model, zs: dict, targets=SVF_TARGETS):
    import torch
    self.model = model.requires_grad_(False)
    layers = model.model.layers
    self.names = {t: [f"model.layers.{i}.{HF_MODULES[t]}.weight" for i in range(len(layers))] for t in targets}
    self.u, self.s, self.vh, self.z = {}, {}, {}, {}
    with torch.no_grad():
      for t, names in self.names.items():
        w = torch.stack([model.get_parameter(n) for n in names]).float()
        self.u[t], self.s[t], self.vh[t] = torch.linalg.svd(w, full_matrices=False)
        z = torch.as_tensor(np.asarray(zs[t], np.float32))
        if tuple(z.shape) != tuple(self.s[t].shape):
          raise ValueError(f"z for {t}: shape {tuple(z.shape)}, the SVD needs {tuple(self.s[t].shape)}")
        self.z[t] = torch.nn.Parameter(z.clone())

  def parameters(self) -> list:
    return list(self.z.values())

  def weights(self) -> dict:
    """name -> W' of every target, [out, in]."""
    import torch
    out = {}
    for t, names in self.names.items():
      s = self.s[t]
      sm = s * torch.sigmoid(self.z[t])
      w = (self.u[t] * sm[:, None, :]) @ self.vh[t] * (s.sum(-1) / sm.sum(-1))[:, None, None]
      out.update(zip(names, w.unbind(0)))
    return out

  def logits(self, ids, mask):
    import torch
    return torch.func.functional_call(self.model, self.weights(), (ids,), {"attention_mask": mask},
                                      strict=False).logits


def theirs(method: str, path, arrays: dict, args, peft_dir=None) -> Side:
  """The peer of `method`: peft's LoRA or `TorchSVF` on the transformers model of `path`, and its step."""
  import torch
  import transformers

  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  model.train()  # as a training loop runs it (no dropout is configured on either side)
  if method == "lora":
    import peft
    from safetensors.torch import load_file
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=peft_names(), lora_dropout=0.0,
                          bias="none")
    pm = peft.get_peft_model(model, cfg)
    weights = load_file(str(Path(peft_dir) / "adapter_model.safetensors"))
    got = peft.set_peft_model_state_dict(pm, weights)
    missing = [k for k in got.missing_keys if "lora_" in k]
    if got.unexpected_keys or missing or len(weights) != 2 * len(pm.base_model.model.model.layers) * len(LORA_TARGETS):
      raise SystemExit(f"the PEFT adapter of our factors did not load into peft: unexpected {got.unexpected_keys[:4]}, "
                       f"missing {missing[:4]}, {len(weights)} tensors")
    params = [p for p in pm.parameters() if p.requires_grad]

    def logits(ids, mask):
      return pm(input_ids=ids, attention_mask=mask).logits
  else:
    svf = TorchSVF(model, {t: arrays[f"svf/{t}"] for t in SVF_TARGETS})
    params, logits = svf.parameters(), svf.logits
  setup_s = time.perf_counter() - t0
  return torch_step(logits, params, arrays["tokens"], args, setup_s)


def torch_step(logits_fn, params, tokens: np.ndarray, args, setup_s: float = 0.0) -> Side:
  """A PyTorch training step: forward, mean next-token cross-entropy on every token, backward, global-norm
  clipping, AdamW (decoupled weight decay), zero_grad."""
  import torch
  import torch.nn.functional as F

  opt = torch.optim.AdamW(params, lr=args.lr, betas=(args.b1, args.b2), eps=args.eps, weight_decay=args.weight_decay)
  tok = torch.as_tensor(tokens)
  ids, targets = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
  mask = torch.ones_like(ids)

  def step() -> float:
    logits = logits_fn(ids, mask)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    if args.clip_norm:
      torch.nn.utils.clip_grad_norm_(params, args.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return Side(step, int(sum(p.numel() for p in params)), 0.0, setup_s)


# ------------------------------------------------------------------------------------------ measuring


def measure(method: str, sides: dict[str, Callable[[], Side]], args) -> dict:
  """Builds each side of `method` (ours first: its compile), runs `args.warmup` steps of each (their
  losses kept: the checks), then `args.steps` timed steps, the sides alternating step by step.
  Returns {"sides": {side: Side}, "losses": {side: warm-up losses}, "times": {side: seconds per step}}."""
  built = {}
  for name, build in sides.items():
    built[name] = build()
    extra = f", compile {built[name].compile_s:.1f}s" if name == "ours" else ""
    print(f"{method} {name}: {built[name].n_trainable:,} trainable parameters (set-up {built[name].setup_s:.1f}s"
          f"{extra})", flush=True)
  losses = {name: [] for name in built}
  for _ in range(args.warmup):
    for name, side in built.items():
      losses[name].append(side.step())
  times = common.alternate({name: side.step for name, side in built.items()}, args.steps)
  return {"sides": built, "losses": losses, "times": times}


def rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-12)


def main(argv=None):
  args = parse(argv)
  machine = common.Machine("jax", "flax", "optax", "torch", "transformers", "peft")
  if args.alone != "ours":
    machine.torch_all_cores()
  out = common.scratch(args)
  if args.alone:
    meta = json.loads((out / "meta.json").read_text())
    path, arrays = Path(meta["path"]), dict(np.load(out / "inputs.npz"))
  else:
    path = model_dir(args)
    arrays = make_inputs(path, out, batch=args.batch, seq=args.seq, methods=args.methods, rank=args.rank,
                         alpha=args.alpha)
    (out / "meta.json").write_text(json.dumps({"path": str(path)}))
  base = None
  if args.alone != "theirs":
    from calm_jax import hf
    base = hf.load(path)
  runs = {}
  for method in args.methods:
    sides = {}
    if args.alone != "theirs":
      sides["ours"] = functools.partial(ours, method, base, arrays, args, out / "svd_cache")
    if args.alone != "ours":
      sides["theirs"] = functools.partial(theirs, method, path, arrays, args, out / "peft")
    runs[method] = measure(method, sides, args)
    runs[method]["sides"] = {k: dataclasses.replace(s, step=None) for k, s in runs[method]["sides"].items()}
    gc.collect()  # the method's models and optimizer states before the next method's
  if args.alone:
    common.report(args, {m: {"median": common.medians(r["times"])[args.alone], "times": r["times"][args.alone]}
                         for m, r in runs.items()})
    return
  _summarize(args, runs, path, machine)


def _summarize(args, runs, path, machine):
  """The checks, each side alone, the printout, the docs run and the JSON line."""
  failures = []
  for method, r in runs.items():
    n = {k: s.n_trainable for k, s in r["sides"].items()}
    if n["ours"] != n["theirs"]:
      failures.append(f"{method}: trainable parameters differ: ours {n['ours']:,}, peer {n['theirs']:,}")
    first = rel(r["losses"]["ours"][0], r["losses"]["theirs"][0])
    r["check"] = {"loss_ours": r["losses"]["ours"][:2], "loss_peer": r["losses"]["theirs"][:2],
                  "first_rel": first, "second_rel": rel(r["losses"]["ours"][1], r["losses"]["theirs"][1])}
    if not first <= LOSS_RTOL:
      failures.append(f"{method}: first-step loss ours {r['losses']['ours'][0]:.6f} vs peer "
                      f"{r['losses']['theirs'][0]:.6f} (relative {first:.1e} > {LOSS_RTOL:.0e})")
  if failures:
    raise SystemExit("correctness check failed: " + "; ".join(failures))

  from calm_jax.malloc import TUNED
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"CALM_JAX_NO_REEXEC": "1"}
  alone = common.each_alone(args, {"ours": env | {"GLIBC_TUNABLES": TUNED}, "theirs": env})
  machine.done()
  tokens = args.batch * args.seq
  peer = {"lora": "peft", "svf": "PyTorch SVF"}
  result, lines = {}, []
  for method, r in runs.items():
    med = common.medians(r["times"])
    a = {side: (alone[side] or {}).get(method, {}).get("median") for side in common.SIDES}
    fast = {side: common.faster(med[side], a[side]) for side in common.SIDES}
    r.update(med=med, alone=a, fast=fast)
    result[method] = {
        "tokens_per_s_ours": round(tokens / fast["ours"], 1), "tokens_per_s_peer": round(tokens / fast["theirs"], 1),
        "speedup": round(fast["theirs"] / fast["ours"], 2), "compile_s_ours": round(r["sides"]["ours"].compile_s, 1),
        "trainable_params": r["sides"]["ours"].n_trainable,
        "first_loss_rel_diff": float(f"{r['check']['first_rel']:.2e}"),
        "second_loss_rel_diff": float(f"{r['check']['second_rel']:.2e}"),
        "median_s_shared": {k: round(v, 4) for k, v in med.items()},
        "median_s_alone": {k: None if v is None else round(v, 4) for k, v in a.items()}}
    print(f"{method}: {r['sides']['ours'].n_trainable:,} trainable parameters on both sides; batch {args.batch} x "
          f"{args.seq} tokens")
    for side, name in (("ours", "ours"), ("theirs", peer[method])):
      also = f"; alone {a[side]:.3f}s of {[round(t, 3) for t in alone[side][method]['times']]}" if a[side] else ""
      print(f"  {name}: median {med[side]:.3f}s/step of {[round(t, 3) for t in r['times'][side]]}{also} -> "
            f"{tokens / fast[side]:.1f} tokens/s")
    c = r["check"]
    print(f"  speedup (each side's faster figure): {result[method]['speedup']:.2f}x; loss step 1 ours "
          f"{c['loss_ours'][0]:.6f} / peer {c['loss_peer'][0]:.6f} (rel {c['first_rel']:.1e}), step 2 "
          f"{c['loss_ours'][1]:.6f} / {c['loss_peer'][1]:.6f} (rel {c['second_rel']:.1e})")
  result["goal_met"] = all(result[m]["speedup"] >= 1.5 for m in runs)
  machine.print_load()
  common.report(args, result, lambda: _write(args, runs, result, path, machine, alone))


def _write(args, runs, result, path, machine, alone):
  from calm_jax.malloc import is_tuned
  tokens = args.batch * args.seq
  what = "random llama (--small)" if args.small else args.model
  where = f"{what} (`{path}`)" if str(path) != str(what) else f"`{path}`"
  names = {"lora": "LoRA", "svf": "SVF"}
  ratio = "; ".join(f"{names[m]} **{result[m]['speedup']}x**" for m in runs)
  ratio += (f" the peer's tokens/s (training step, {what}, batch {args.batch} x {args.seq}, fp32, AdamW; LoRA vs peft, "
            "SVF vs a PyTorch SVF; each side's faster of shared / alone process)")
  rows = []
  for m, r in runs.items():
    for side, name in (("ours", f"ours ({'calm_jax.lora' if m == 'lora' else 'svf.model'})"),
                       ("theirs", "peft + transformers" if m == "lora" else "PyTorch SVF + transformers")):
      rows.append([m, name, f"{r['sides'][side].n_trainable:,}", f"{r['med'][side]:.3f}",
                   f"{min(r['times'][side]):.3f}", common.cell(r["alone"][side], ".3f"),
                   f"{tokens / r['fast'][side]:.1f}",
                   f"{r['sides'][side].compile_s:.1f}" if side == "ours" else "-",
                   f"{r['check']['loss_ours' if side == 'ours' else 'loss_peer'][0]:.6f}"])
  table = common.md_table(["method", "side", "trainable params", "median s/step, shared", "min s", "median s, alone",
                           "tokens/s (faster median)", "compile s", "first-step loss"], rows)
  checks = "; ".join(f"{m}: first-step loss relative difference {r['check']['first_rel']:.1e}, second step "
                     f"{r['check']['second_rel']:.1e}" for m, r in runs.items())
  common.write_run(TITLE, f"""
{machine.line()}
- model: {where}, fp32; batch {args.batch} x {args.seq} input tokens (random ids, the same on both
  sides), next-token loss on every token
- optimizer, both sides: AdamW lr {args.lr:g}, betas ({args.b1:g}, {args.b2:g}), eps {args.eps:g}, weight decay
  {args.weight_decay:g}, global-norm clip {args.clip_norm:g}
- timing: {args.warmup} warm-up steps, then {args.steps} timed steps per side, the sides alternating; our compile
  timed apart; one process, under glibc tunables {'`calm_jax.malloc.TUNED`' if is_tuned() else 'as started'}
- LoRA: rank {args.rank}, alpha {args.alpha:g}, q k v o gate up down; ours `calm_jax.lora.LoRAModel` with the trainer's
  step, peft `LoraConfig` on the same modules (the same starting factors, through our PEFT export)
- SVF: z on the MLP matrices (gate, up, down), m = sigmoid(z); ours `svf.model.SVFModel`, the peer `TorchSVF`
  (benchmarks/train_step.py: `torch.linalg.svd` factors, W' swapped in by `torch.func.functional_call`)
{alone.line("ours under TUNED, the peer under glibc's default allocator")}
- checks: equal trainable parameter counts; {checks}
- code: {common.code_version()}; command: `{common.command()}`

{table}

Goal: ours >= 1.5x the peer on both methods: {'met' if result['goal_met'] else 'not met'}.
""", ratio, machine)


if __name__ == "__main__":
  from calm_jax.malloc import reexec_tuned
  reexec_tuned()
  main()
