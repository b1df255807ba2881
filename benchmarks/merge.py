"""Streaming checkpoint merge: `python -m launch.merge` vs `mergekit-yaml`, and the raw I/O floor.

Generates a llama-shaped bf16 base and 3 fine-tuned checkpoints (default ~0.48B params each:
hidden 1024, 32 layers, intermediate 2816, vocab 32000, untied lm_head; fine-tuned = base +
N(0, delta_std) per entry, rounded to bf16), sharded safetensors + index + config.json, written
with `calm_jax.safetensors_io.ShardedWriter` into a temporary directory. Then, per round, each
merge runs as its own subprocess (end to end: interpreter start, imports, JAX compile / torch
set-up, reading, merging, writing), timed, with its peak RSS (the child's VmHWM, polled):

  * task_arithmetic  ours (weights 1,1,1, λ 0.5)    vs mergekit `task_arithmetic` (same, normalize false)
  * TIES             ours `ties.py:mergekit`, density 0.5 vs mergekit `ties` (density 0.5, weight 1)
  * MetaGPT          ours `metagpt.py`              vs mergekit `task_arithmetic` with `weight: λ_t`
                                                      from our report, `normalize: false`, `lambda: 1`
  * I/O floor        a subprocess that reads every input byte once and writes a file of the
                     merged output's size, the fastest way this VM's disk took: 64 MB O_DIRECT
                     reads in 4 threads (1.6-2.2 GB/s; one thread 0.9-1.6, 8 MB requests 0.9-1.0),
                     an O_DIRECT write, fsync (buffered where O_DIRECT is refused).

Ours keeps compiled kernels in its persistent compile cache (`calm_jax/compile_cache.py`), in a
directory fresh for each benchmark run: round 1 compiles, later rounds load (the table lists every
round). mergekit runs on the CPU (no `--cuda`), `--lazy-unpickle`, one output shard (its default 5B
params), no tokenizer copy or model card, `dtype: float32` (it computes in fp32, as we do) and
`out_dtype: bfloat16`; both sides write bf16. The page cache is dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`) before every timed run when that is allowed, else every side runs
warm. Outputs of the first round are compared (max |ours − mergekit| on a few tensors). Rounds
stop early at `--max-minutes`; an interrupted run (Ctrl-C, SIGTERM) reports its complete rounds.

Adds the run to docs/benchmarks.md (its section, and its row of the summary table; `common.write_run`)
and prints one JSON object of the headline figures as the last line.
Run: `.venv/bin/python benchmarks/merge.py` (`--small` for a quick smoke run).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from common import ROOT

TITLE = "Streaming checkpoint merge vs mergekit"
MODEL = dict(hidden=1024, layers=32, heads=16, intermediate=2816, vocab=32000)

IO_FLOOR = """
import mmap, os, sys, threading
from concurrent.futures import ThreadPoolExecutor
out, nbytes, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
B, DIRECT = 64 << 20, getattr(os, "O_DIRECT", 0)
local = threading.local()

def read(job):
  path, off = job
  if not hasattr(local, "buf"):
    local.buf = mmap.mmap(-1, B)  # page-aligned, as O_DIRECT needs
  try:
    fd = os.open(path, os.O_RDONLY | DIRECT)
  except OSError:
    fd = os.open(path, os.O_RDONLY)
  try:
    return os.preadv(fd, [local.buf], off)
  finally:
    os.close(fd)

jobs = [(f, off) for f in files for off in range(0, os.path.getsize(f), B)]
with ThreadPoolExecutor(4) as pool:
  total = sum(pool.map(read, jobs))
buf, fd = mmap.mmap(-1, B), None
try:
  fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | DIRECT, 0o644)
  os.write(fd, memoryview(buf)[:4096])  # EINVAL where O_DIRECT opens but cannot write (tmpfs)
  os.lseek(fd, 0, 0)
except OSError:
  if fd is not None:
    os.close(fd)
  fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
left = -(-nbytes // 4096) * 4096
while left:
  left -= os.write(fd, memoryview(buf)[:min(left, B)])
os.ftruncate(fd, nbytes)
os.fsync(fd)
os.close(fd)
print(total)
"""


def llama_specs(h, layers, inter, vocab):
  specs = [("model.embed_tokens.weight", (vocab, h))]
  for i in range(layers):
    p = f"model.layers.{i}."
    specs += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
              (p + "self_attn.k_proj.weight", (h, h)), (p + "self_attn.v_proj.weight", (h, h)),
              (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
              (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
              (p + "mlp.down_proj.weight", (h, inter))]
  specs += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
  return specs


def generate(root: Path, args, n_models: int):
  """base + n_models fine-tuned checkpoints; returns (base dir, [model dirs], params per model)."""
  import ml_dtypes

  from calm_jax.safetensors_io import ShardedWriter

  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = llama_specs(args.hidden, args.layers, args.intermediate, args.vocab)
  dirs = [root / "base"] + [root / f"ft{i}" for i in range(n_models)]
  config = common.llama_config(args, torch_dtype="bfloat16")
  config.architectures = ["LlamaForCausalLM"]
  for d in dirs:
    d.mkdir(parents=True)
    config.save_pretrained(d)
  rng = np.random.default_rng(0)
  writers = [ShardedWriter(d, [(n, s, bf16) for n, s in specs], args.shard_size) for d in dirs]
  for name, shape in specs:
    if name.endswith("norm.weight"):
      base = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    else:
      base = args.init_std * rng.standard_normal(shape, dtype=np.float32)
    base = base.astype(bf16)
    writers[0].write(name, base)
    base32 = base.astype(np.float32)
    for w in writers[1:]:
      delta = rng.standard_normal(shape, dtype=np.float32)
      delta *= args.delta_std
      delta += base32
      w.write(name, delta.astype(bf16))
  for w in writers:
    w.close()
  return dirs[0], dirs[1:], sum(int(np.prod(s)) for _, s in specs)


def drop_caches() -> bool:
  try:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3\n")
    return True
  except OSError:
    return False


def _hwm(pid) -> int:
  """Peak RSS so far (VmHWM) of one live process, in bytes; 0 once it has exited."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def timed(cmd, log: Path, env, drop: bool, poll_s: float = 0.05):
  """(wall s, peak RSS bytes, page cache dropped) of one subprocess.

  Peak RSS is the child tree's VmHWM, polled every `poll_s` (summed over its processes). Not
  `ru_maxrss`: a child started by `subprocess` (vfork + exec) inherits this process's peak RSS
  in its rusage, which would charge the generator's memory to every side.
  """
  import psutil
  dropped = drop and drop_caches()
  with open(log, "w") as f:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    peaks = {}
    try:
      proc = psutil.Process(p.pid)
      while p.poll() is None:
        try:
          pids = [p.pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
          pids = [p.pid]
        for pid in pids:
          peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
        time.sleep(poll_s)
    except BaseException:
      p.kill()
      p.wait()
      raise
    wall = time.perf_counter() - t0
  if p.returncode != 0:
    sys.stdout.write(log.read_text()[-4000:])
    raise SystemExit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}")
  return wall, sum(peaks.values()), dropped


def safetensors_bytes(d: Path) -> int:
  return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def mk_yaml(path: Path, method, base, fts, weights, density=None, parameters=None):
  import yaml
  models = []
  for f, w in zip(fts, weights):
    p = {"weight": float(w)}
    if density is not None:
      p["density"] = float(density)
    models.append({"model": str(f), "parameters": p})
  cfg = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32",
         "out_dtype": "bfloat16"}
  if parameters:
    cfg["parameters"] = parameters
  path.write_text(yaml.safe_dump(cfg))
  return path


def compare(a: Path, b: Path, names):
  """{tensor: (max |a − b|, fraction of entries that differ, max |a|)} and the output dtypes."""
  from calm_jax.safetensors_io import CheckpointReader
  ra, rb = CheckpointReader(a), CheckpointReader(b)
  assert set(ra.keys()) == set(rb.keys()), (set(ra.keys()) ^ set(rb.keys()))
  out = {}
  for n in names:
    x, y = ra.get(n).astype(np.float32), rb.get(n).astype(np.float32)
    d = np.abs(x - y)
    out[n] = (float(d.max()), float(np.mean(d > 0)), float(np.abs(x).max()))
  dtypes = {str(ra.dtype(n)) for n in ra.keys()} | {str(rb.dtype(n)) for n in rb.keys()}
  return out, dtypes


def main(argv=None):
  ap = common.parser(__doc__, model=MODEL, runs=2, runs_help="rounds (each runs every merge once); medians over them")
  ap.add_argument("--init-std", type=float, default=0.02)
  ap.add_argument("--delta-std", type=float, default=0.002, help="std of the fine-tuning deltas")
  ap.add_argument("--shard-size", default="400MB", help="input shard size")
  ap.add_argument("--max-minutes", type=float, default=15,
                  help="start no further round when it would end past this many minutes of merging")
  ap.add_argument("--only", default="ta,ties,metagpt,ta_low",
                  help="comma-separated subset of ta,ties,metagpt and their _low variants (low_memory=True)")
  ap.add_argument("--tmp", default=None, help="parent of the temporary directory (default: the system's)")
  ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
  ap.add_argument("--no-drop", action="store_true",
                  help="do not drop the page cache before timed runs (implied by --small)")
  # a smoke run keeps the page cache: dropping it (as root) slows every other process on the machine
  args = common.parse(ap, argv, small={**common.SMALL_MODEL, "intermediate": 176, "shard_size": "64KB", "runs": 1,
                                       "no_drop": True})
  cases = [c for c in args.only.split(",") if c]

  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill the running merge and clean up

  machine = common.Machine("jax", "mergekit", "torch")
  git = common.code_version("merging", "calm_jax")
  print(f"code: {git}", flush=True)
  tmp = Path(tempfile.mkdtemp(prefix="merge_bench_", dir=args.tmp))
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT), "CALM_JAX_COMPILE_CACHE": str(tmp / "xla_cache")}  # fresh: round 1 compiles
  py, mk = sys.executable, str(Path(sys.executable).with_name("mergekit-yaml"))
  try:
    t0 = time.perf_counter()
    base, fts, n_params = generate(tmp, args, 3)
    gen_s = time.perf_counter() - t0
    in_bytes = [safetensors_bytes(d) for d in [base, *fts]]
    in_files = [str(f) for d in [base, *fts] for f in sorted(d.glob("*.safetensors"))]
    print(f"generated base + 3 fine-tuned: {n_params:,} params each ({in_bytes[0] / 1e9:.3f} GB bf16, "
          f"{len(list(base.glob('*.safetensors')))} shards) in {gen_s:.1f}s under {tmp}", flush=True)
    models = ",".join(map(str, fts))

    def ours(method_cfg, out, *extra):
      return [py, "-m", "launch.merge", f"--config={ROOT / 'configs/merge' / method_cfg}", f"--config.base={base}",
              f"--config.models={models}", f"--config.out={out}", "--config.overwrite", "--config.progress=False",
              *extra]

    def theirs(yml, out):
      return [mk, str(yml), str(out), "--lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]

    ta_yml = mk_yaml(tmp / "ta.yml", "task_arithmetic", base, fts, [1, 1, 1],
                     parameters={"normalize": False, "lambda": 0.5})
    ties_yml = mk_yaml(tmp / "ties.yml", "ties", base, fts, [1, 1, 1], density=0.5)
    pairs = {  # case: (ours cmd builder, mergekit cmd builder)
        "ta": (lambda o: ours("task_arithmetic.py", o, "--config.weights=1,1,1", "--config.lam=0.5"),
               lambda o: theirs(ta_yml, o)),
        "ties": (lambda o: ours("ties.py:mergekit", o, "--config.weights=1,1,1", "--config.density=0.5"),
                 lambda o: theirs(ties_yml, o)),
        "metagpt": (lambda o: ours("metagpt.py", o), None),  # mergekit side built from our λ's
    }
    # ours runs under launch.merge's tuned allocator (calm_jax/malloc.py); "_low": the same merge with
    # --config.low_memory=True (glibc returns freed buffers at once: the smallest peak RSS)
    for c in ("ta", "ties", "metagpt"):
      pairs[c + "_low"] = (lambda o, c=c: pairs[c][0](o) + ["--config.low_memory=True"], pairs[c][1])
    times = {k: [] for k in ["io"] + [f"{c}_{s}" for c in cases for s in ("ours", "mk")]}
    rss = {k: [] for k in times}
    dropped_all, diffs, lambdas = True, {}, None
    probe = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             f"model.layers.{args.layers // 2}.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]

    def record(key, res):
      nonlocal dropped_all
      times[key].append(res[0])
      rss[key].append(res[1])
      dropped_all &= res[2]
      print(f"  {key:12s} {res[0]:8.2f} s  peak RSS {res[1] / 2**30:6.2f} GiB", flush=True)

    out_bytes = in_bytes[0]  # the merged model has the base's tensors and dtypes
    io_cmd = [py, "-c", IO_FLOOR, str(tmp / "io_out.bin"), str(out_bytes), *in_files]
    rounds, t_rounds = 0, time.perf_counter()
    try:
      for r in range(args.runs):
        spent = time.perf_counter() - t_rounds
        if r and spent / r * (r + 1) > args.max_minutes * 60:
          print(f"stopping after {r} round(s): another would pass --max-minutes={args.max_minutes}", flush=True)
          break
        print(f"round {r + 1}/{args.runs} (1-min load {os.getloadavg()[0]:.2f})", flush=True)
        record("io", timed(io_cmd, tmp / "io.log", env, not args.no_drop))
        (tmp / "io_out.bin").unlink()
        for case in cases:
          ours_out, mk_out = tmp / f"ours_{case}", tmp / f"mk_{case}"
          shutil.rmtree(mk_out, ignore_errors=True)
          record(f"{case}_ours", timed(pairs[case][0](ours_out), tmp / f"{case}_ours.log", env, not args.no_drop))
          if case.startswith("metagpt"):
            lambdas = json.loads((ours_out / "merge_report.json").read_text())["lambdas"]
            yml = mk_yaml(tmp / "metagpt_ta.yml", "task_arithmetic", base, fts, lambdas,
                          parameters={"normalize": False, "lambda": 1.0})
            mk_cmd = theirs(yml, mk_out)
          else:
            mk_cmd = pairs[case][1](mk_out)
          record(f"{case}_mk", timed(mk_cmd, tmp / f"{case}_mk.log", env, not args.no_drop))
          if r == 0:
            diffs[case] = compare(ours_out, mk_out, probe)
            print(f"  {case}: max |ours - mergekit| {max(v[0] for v in diffs[case][0].values()):.3g}", flush=True)
          shutil.rmtree(ours_out)
          shutil.rmtree(mk_out)
        rounds = r + 1
    except (KeyboardInterrupt, SystemExit):
      if not rounds:
        raise
      print(f"interrupted: reporting the {rounds} complete round(s)", flush=True)
    for k in times:  # drop a partial round
      del times[k][rounds:], rss[k][rounds:]
    args.runs = rounds
    machine.done()
  finally:
    if args.keep:
      print(f"kept {tmp}")
    else:
      shutil.rmtree(tmp, ignore_errors=True)

  med = common.medians(times)
  mrss = {k: max(v) for k, v in rss.items() if v}
  result = {}
  for c in cases:
    result[f"speedup_vs_mergekit_{c}"] = round(med[f"{c}_mk"] / med[f"{c}_ours"], 2)
    result[f"peak_rss_ratio_{c}"] = round(mrss[f"{c}_ours"] / mrss[f"{c}_mk"], 2)
    result[f"ours_over_io_floor_{c}"] = round(med[f"{c}_ours"] / med["io"], 2)
  for c, (d, _) in diffs.items():
    result[f"max_abs_diff_{c}"] = max(v[0] for v in d.values())

  dropped = dropped_all and not args.no_drop
  print(f"\n{n_params:,} params per model, 4 inputs {sum(in_bytes) / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB; "
        f"{machine.ncpu} CPUs; page cache {'dropped before every run' if dropped else 'warm'}")
  for k in times:
    if times[k]:
      print(f"{k:12s} median {med[k]:8.2f} s of {[round(t, 2) for t in times[k]]}, peak RSS max "
            f"{mrss[k] / 2**30:.2f} GiB")
  for c, (d, dtypes) in diffs.items():
    print(f"{c}: ours vs mergekit output dtypes {sorted(dtypes)}; "
          "per tensor (max |diff|, fraction differing, max |x|):")
    for n, v in d.items():
      print(f"   {n}: {v[0]:.3g}, {v[1]:.3g}, {v[2]:.3g}")
  if lambdas:
    print(f"MetaGPT λ: {[round(x, 6) for x in lambdas]}")
  machine.print_load()

  def write():
    run = dict(n_params=n_params, in_bytes=in_bytes, out_bytes=out_bytes, gen_s=gen_s, dropped=dropped, git=git)
    _write(result, args, run, med, mrss, times, diffs, lambdas, machine)

  common.report(args, result, write)


NAMES = {"ta": "task_arithmetic (w 1,1,1, λ 0.5)", "ties": "TIES, mergekit convention, density 0.5",
         "metagpt": "MetaGPT vs mergekit task_arithmetic with weight λ_t"}
NAMES.update({c + "_low": NAMES[c] + ", `low_memory=True`" for c in list(NAMES)})
SHORT = {"ta": "task arithmetic", "ties": "TIES", "metagpt": "MetaGPT"}
SHORT.update({c + "_low": SHORT[c] + " `low_memory`" for c in list(SHORT)})


COLUMNS = ["method", "ours s (rounds)", "mergekit s (rounds)", "speedup vs mergekit", "ours peak RSS GiB",
           "mergekit peak RSS GiB", "RSS ratio ours/mk", "ours / I/O floor"]


def _write(result, args, run, med, mrss, times, diffs, lambdas, machine):
  gib = 2 ** 30
  cases = [k[:-5] for k in med if k.endswith("_ours")]
  speedups = ", ".join(f"{SHORT[c]} **{result['speedup_vs_mergekit_' + c]}x**" for c in cases)
  rss_ratios = [result["peak_rss_ratio_" + c] for c in cases]
  ratio = (f"mergekit's time / ours, end to end: {speedups}; peak RSS ours / mergekit "
           f"{min(rss_ratios)}-{max(rss_ratios)} ({run['n_params'] / 1e6:.1f}M-param bf16 checkpoints, 3 models)")

  def cells(c):
    rounds = {k: ", ".join(f"{t:.1f}" for t in times[c + k]) for k in ("_ours", "_mk")}
    return [NAMES[c], f"{med[c + '_ours']:.1f} ({rounds['_ours']})", f"{med[c + '_mk']:.1f} ({rounds['_mk']})",
            f"**{result['speedup_vs_mergekit_' + c]}x**", f"{mrss[c + '_ours'] / gib:.2f}",
            f"{mrss[c + '_mk'] / gib:.2f}", result["peak_rss_ratio_" + c], result["ours_over_io_floor_" + c]]

  agree = "; ".join(f"{c}: max |ours − mergekit| {max(v[0] for v in d.values()):.3g}, "
                    f"fraction of entries differing ≤ {max(v[1] for v in d.values()):.3g}"
                    for c, (d, _) in diffs.items())
  in_bytes, out_bytes = run["in_bytes"], run["out_bytes"]
  common.write_run(TITLE, f"""
{machine.line()}
- checkpoints: random llama, {run['n_params']:,} params each (hidden {args.hidden}, {args.layers} layers,
  intermediate {args.intermediate}, vocab {args.vocab}, untied lm_head), bf16, {in_bytes[0] / 1e9:.2f} GB each in
  {args.shard_size} shards + index; base + 3 fine-tuned (base + N(0, {args.delta_std}) per entry);
  4 inputs {sum(in_bytes) / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB bf16 (generated in {run['gen_s']:.0f} s)
- each merge is one subprocess, end to end (start-up, imports, compile, read, merge, write); peak RSS
  is the child's VmHWM polled every 50 ms (file-backed mmap pages it has mapped count); page cache
  {'dropped before every run' if run['dropped'] else 'warm for every run (not dropped)'};
  median of {args.runs} round(s); mergekit: `mergekit-yaml --lazy-unpickle --no-copy-tokenizer
  --no-write-model-card`, CPU, `dtype: float32`, `out_dtype: bfloat16`; ours: `python -m launch.merge`
  (under its tuned glibc allocator, `calm_jax/malloc.py`; its persistent compile cache,
  `calm_jax/compile_cache.py`, starts empty: round 1 compiles the kernels, later rounds load them)
- I/O floor (read every input byte once: 64 MB O_DIRECT reads in 4 threads; write {out_bytes / 1e9:.2f} GB
  O_DIRECT + fsync): median {med['io']:.1f} s of {[round(t, 1) for t in times['io']]}, peak RSS
  {mrss['io'] / gib:.2f} GiB
- code: {run['git']}; command: `{common.command()}`

{common.md_table(COLUMNS, [cells(c) for c in cases])}

Outputs agree: {agree}.{f' MetaGPT λ = {[round(x, 5) for x in lambdas]}.' if lambdas else ''}
Goal: ≥ 3× faster than mergekit at no more peak memory, within 3× of the I/O floor.
""", ratio, machine)


if __name__ == "__main__":
  main()
