"""Plumbing the side-by-side benchmarks share: flags, timing, a side alone in its own process, the
machine's description, and the docs/benchmarks.md writer.

docs/benchmarks.md keeps one shape: a title and intro, one table of the latest figure per benchmark
(`SUMMARY_COLUMNS`), then `RUNS_HEADING` with every dated run, oldest first. `write_run` appends a run
at the end and replaces that benchmark's row in the table, so the table always shows the newest run.
Scripts run as `python benchmarks/<name>.py`, which puts this folder on sys.path; importing this
module puts the repository root ahead of it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first: the root's `calm` package, not benchmarks/calm.py
DOC = ROOT / "docs" / "benchmarks.md"

# Model sizes of the --small smoke runs of the llama-shaped benchmarks.
SMALL_MODEL = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512)


# ---------------------------------------------------------------------------------------------- flags


def parser(doc: str, model: dict | None = None, runs: int | None = None,
           runs_help: str | None = None) -> argparse.ArgumentParser:
  """The flags every benchmark has (--small, --no-write), the model-size flags when `model` gives
  their defaults (hidden, layers, heads, intermediate, vocab), and --runs when `runs` is given."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  for name, default in (model or {}).items():
    ap.add_argument(f"--{name}", type=int, default=default)
  if runs is not None:
    ap.add_argument("--runs", type=int, default=runs, help=runs_help)
  ap.add_argument("--small", action="store_true", help="tiny sizes, a smoke run (nothing written)")
  ap.add_argument("--no-write", action="store_true", help="do not append to docs/benchmarks.md")
  return ap


def parse(ap: argparse.ArgumentParser, argv=None, small: dict | None = None) -> argparse.Namespace:
  """Parses argv; with --small the `small` overrides replace the sizes."""
  args = ap.parse_args(argv)
  if args.small:
    vars(args).update(small or {})
  return args


def report(args, result, write: Callable[[], None] | None = None) -> None:
  """Runs `write` (the docs section) unless --small or --no-write, then prints the headline figures as
  one JSON object: the last line on stdout, what a caller reads. A side alone (--alone) prints its
  figures with the SIDES libraries its process imported, for `each_alone` to read."""
  if getattr(args, "alone", None):
    result = {"figures": result, "imported": [lib for lib in SIDES.values() if lib in sys.modules]}
  elif write is not None and not (args.small or args.no_write):
    write()
  print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- timing


class CompileTime:
  """Seconds JAX spent tracing, lowering and compiling since this object was made (JAX reports each
  as a monitoring event), so a first call's compile time can be told from its run time."""

  def __init__(self):
    import jax
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name, secs, **_):
    if name.startswith("/jax/core/compile/"):
      self.seconds += secs


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  """(what one call returns, its wall seconds)."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 0,
              per: int = 1) -> dict[str, list[float]]:
  """Calls the functions in turn, `warmup` untimed rounds then `runs` timed ones, so a slow spell of the
  machine hits every side alike; returns each function's seconds per round divided by `per` (the
  number of steps one call makes)."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {k: [] for k in fns}
  for _ in range(runs):
    for k, fn in fns.items():
      times[k].append(timed(fn)[1] / per)
  return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
  return {k: statistics.median(v) for k, v in times.items() if v}


def ms(ts) -> list[float]:
  """Seconds as milliseconds rounded to 0.1, for printing a list of times."""
  return [round(t * 1e3, 1) for t in ts]


# ------------------------------------------------------------------------ one side in its own process

# The sides of every benchmark and the array library each runs on: a side alone imports only its own.
SIDES = {"ours": "jax", "theirs": "torch"}
_SCRATCH: list[tempfile.TemporaryDirectory] = []  # this process's scratch folder, made on first use


def add_alone(ap: argparse.ArgumentParser) -> None:
  """--no-alone (skip `each_alone`), and the hidden flags of a side's own process: --alone=SIDE (measure
  only that side, print its figures: `report`) and --alone-dir (the parent's `scratch` folder)."""
  ap.add_argument("--no-alone", action="store_true",
                  help="time the sides together in one process only, not each again alone in its own process")
  ap.add_argument("--alone", choices=tuple(SIDES), help=argparse.SUPPRESS)
  ap.add_argument("--alone-dir", help=argparse.SUPPRESS)


def scratch(args) -> Path:
  """A folder for what a side alone reads from its parent (a checkpoint, matrices), so that its process
  needs neither the other side's library nor to draw the data again: the parent's (--alone-dir) in a
  side's own process, else a temporary folder of this process, removed at exit."""
  if getattr(args, "alone_dir", None):
    return Path(args.alone_dir)
  if not _SCRATCH:
    _SCRATCH.append(tempfile.TemporaryDirectory(prefix="benchmark-"))
  return Path(_SCRATCH[0].name)


def last_json(stdout: str):
  """The JSON value on the last non-empty line of a process's output."""
  return json.loads(stdout.strip().splitlines()[-1])


def run_alone(side: str, env: dict | None = None, argv=None):
  """Runs this script again in a fresh process with the same arguments (or `argv`) plus --alone=side
  (and --alone-dir when this process made a `scratch` folder), under `env`, and returns the JSON of its
  last stdout line: a side timed without the other's caches, heap and idle threads in its process, as
  its users run it."""
  argv = sys.argv[1:] if argv is None else list(argv)
  cmd = [sys.executable, str(Path(sys.argv[0]).resolve()), *argv, f"--alone={side}"]
  if _SCRATCH:
    cmd.append(f"--alone-dir={_SCRATCH[0].name}")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    sys.stdout.write(proc.stdout[-2000:] + proc.stderr[-4000:])
    raise SystemExit(f"--alone={side} failed ({proc.returncode}): {' '.join(cmd)}")
  return last_json(proc.stdout)


class Alone:
  """Each side measured again in a process of its own (`each_alone`): the same sizes, seed, warm-up
  and number of timed runs as the shared process, importing only that side's library. Empty under
  --no-alone."""

  def __init__(self, runs: dict[str, dict]):
    self.runs = runs  # side -> {"figures": what its `report` printed, "imported": [libraries]}

  def __getitem__(self, side: str):
    """That side's figures, or None when not run."""
    return self.runs[side]["figures"] if side in self.runs else None

  def get(self, side: str, key: str):
    """One figure of that side's alone run, or None when not run."""
    return self.runs[side]["figures"][key] if side in self.runs else None

  def line(self, how: str = "") -> str:
    """The docs' bullet on the alone runs; `how` says how the processes run (their environment)."""
    if not self.runs:
      return "- each side alone: not run (`--no-alone`); every figure is the shared process's"
    imported = "; ".join(f"{side} {', '.join(r['imported']) or 'neither'}" for side, r in self.runs.items())
    return ("- each side also alone: a fresh process per side (`--alone`), the same sizes, seed, warm-up and\n"
            f"  number of timed runs, importing only its own side's library (imported: {imported})"
            f"{'; ' + how if how else ''};\n  each side's figure in the headline is the faster of its shared-process "
            "and alone figures")


def each_alone(args, env: dict[str, dict] | None = None) -> Alone:
  """Every side of SIDES timed again by `run_alone`, under its `env` (default: this process's), unless
  --no-alone. A process that imported the other side's library is said (its figures still count)."""
  runs = {}
  for side, lib in ({} if args.no_alone else SIDES).items():
    runs[side] = run_alone(side, (env or {}).get(side))
    other = set(runs[side]["imported"]) - {lib}
    if other:
      print(f"note: {side} alone also imported {', '.join(sorted(other))}")
  return Alone(runs)


def faster(shared: float, alone: float | None) -> float:
  """A side's headline seconds: the faster of its shared-process and alone figures (shared when no alone)."""
  return shared if alone is None else min(shared, alone)


def cell(value: float | None, spec: str = ".1f") -> str:
  """A table cell of a figure that may be missing ('-')."""
  return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------- the machine


class Machine:
  """The machine a run measures on: CPUs, memory, accelerator, library versions, and the 1-min load
  average at the start (on creation) and the end (`done`). Other processes on the cores slow both
  sides, torch's OpenMP loops far more than XLA's, so the load goes with the figures."""

  def __init__(self, *packages: str):
    self.packages = packages
    self.ncpu = os.cpu_count() or 1
    self.torch_threads = None
    self.load = [os.getloadavg()[0]]

  def torch_all_cores(self) -> int:
    """Lets torch use every core (XLA does by default); returns the core count."""
    import torch
    torch.set_num_threads(self.ncpu)
    self.torch_threads = torch.get_num_threads()
    return self.ncpu

  def done(self) -> Machine:
    self.load.append(os.getloadavg()[0])
    return self

  @property
  def load_text(self) -> str:
    return f"{self.load[0]:.2f} / {self.load[-1]:.2f}"

  @staticmethod
  def ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30

  @staticmethod
  def accelerator() -> str | None:
    """The first JAX device's kind when JAX runs on an accelerator, else None."""
    if "jax" not in sys.modules:
      return None
    dev = sys.modules["jax"].devices()[0]
    return None if dev.platform == "cpu" else dev.device_kind

  def versions(self) -> str:
    out = []
    for p in self.packages:
      try:
        out.append(f"{p} {importlib.metadata.version(p)}")
      except importlib.metadata.PackageNotFoundError:
        out.append(f"{p} (not installed)")
    text = ", ".join(out)
    if self.torch_threads:
      text += f"; torch on all cores (`torch.set_num_threads({self.torch_threads})`)"
    return text

  def line(self) -> str:
    """The docs' `machine:` bullet."""
    acc = self.accelerator()
    return (f"- machine: `{platform.platform()}`, {platform.processor() or platform.machine()}, {self.ncpu} CPUs, "
            f"{self.ram_gib():.1f} GiB RAM{f', {acc}' if acc else ''};\n  {self.versions()};\n"
            f"  1-min load average before/after the run {self.load_text}")

  def cell(self) -> str:
    """The machine in a few words, for the summary table."""
    acc = self.accelerator()
    return (f"{platform.machine()}, {self.ncpu} CPUs{f', {acc}' if acc else ''}; load {self.load[0]:.1f} → "
            f"{self.load[-1]:.1f}")

  def print_load(self) -> None:
    print(f"1-min load average before/after: {self.load_text} (other processes compete when > 0)")


CODE = ("calm_jax", "calm", "merging", "svf", "moa", "benchmarks")  # what a figure depends on (not docs/)


def code_version(*paths: str) -> str:
  """The checkout's short commit, noting uncommitted changes under `paths` (default: the code, CODE)."""
  git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
  rev = git.stdout.strip() or "unknown"
  paths = paths or CODE
  dirty = subprocess.run(["git", "status", "--porcelain", *paths], cwd=ROOT, capture_output=True, text=True).stdout
  where = " or ".join(f"{p}/" for p in paths)
  return rev + (f" (uncommitted changes in {where})" if dirty.strip() else "")


def command() -> str:
  """The command line that ran this script, as a user would type it from the repository root."""
  script = Path(sys.argv[0]).resolve()
  try:
    script = script.relative_to(ROOT)
  except ValueError:
    pass
  return " ".join(["python", str(script), *sys.argv[1:]])


# ------------------------------------------------------------------------------------ shared models


def llama_config(args, **extra):
  """A transformers LlamaConfig of the args' sizes (multi-head attention, untied head) plus `extra`."""
  import transformers
  return transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
      tie_word_embeddings=False, **extra)


def random_llama(args, init_std: float, **extra):
  """A random fp32 transformers llama (torch seed 0) and our model loaded from its `save_pretrained`
  checkpoint: both sides start from the same weights. Returns (torch model, ours, #params). The
  checkpoint stays in `scratch`; a side alone (--alone) makes only its own model (the other is None):
  theirs drawn again from seed 0, ours loaded from the parent's checkpoint, so that neither imports
  the other side's library."""
  side, ref, model = getattr(args, "alone", None), None, None
  path = scratch(args) / "llama"
  if side != "ours":
    import torch
    import transformers
    torch.manual_seed(0)
    config = llama_config(args, max_position_embeddings=4096, initializer_range=init_std, **extra)
    ref = transformers.LlamaForCausalLM(config).eval().to(torch.float32)
    n_params = sum(p.numel() for p in ref.parameters())
    if not side:
      ref.save_pretrained(path)
  if side != "theirs":
    import jax

    from calm_jax import hf
    model = hf.load(path)
    if ref is None:
      n_params = sum(x.size for x in jax.tree.leaves(model.params()))
  return ref, model, n_params


# --------------------------------------------------------------------------------- docs/benchmarks.md

RUNS_HEADING = "## Runs"
SUMMARY_COLUMNS = ["benchmark", "ours vs peer", "date", "machine", "command"]
INTRO = """# Benchmarks

Side-by-side runs of our implementation against a peer tool (`benchmarks/`). Ratios matter; absolute
times depend on the machine and on what else ran on it. The table holds the latest run of each
benchmark; every run, with its set-up and readings, follows under Runs, oldest first.

"""


def md_row(cells) -> str:
  """One markdown table row; a cell may not hold '|' or a newline."""
  return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: list[str], rows: list[list]) -> str:
  return "\n".join(md_row(r) for r in [header, ["---"] * len(header), *rows])


def anchor(heading: str) -> str:
  """GitHub's link target for a markdown heading."""
  return "#" + re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def write_run(title: str, body: str, ratio: str, machine: Machine, path: Path | None = None) -> None:
  """Appends a dated run section (`### title (date)` then `body`) under the runs heading and puts
  `ratio` (ours vs the peer, saying what the ratio means) in this title's row of the summary table."""
  script, path = Path(sys.argv[0]).name, path or DOC
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  heading = f"{title} ({date})"
  text = path.read_text() if path.exists() else ""
  head, sep, runs = text.partition(f"\n{RUNS_HEADING}\n")
  if not sep:  # no runs heading yet: what the file held goes under it
    head, runs = "", text
  row = [f"{title} (`{script}`)", ratio, f"[{date}]({anchor(heading)})", machine.cell(), f"`{command()}`"]
  head = _with_row(head or INTRO, row[0], md_row(c.replace("|", "/").replace("\n", " ") for c in row))
  runs = "\n\n".join(p for p in (runs.strip("\n"), f"### {heading}\n\n{body.strip()}") if p)
  path.parent.mkdir(exist_ok=True)
  path.write_text(f"{head.rstrip()}\n\n{RUNS_HEADING}\n\n{runs}\n")


def _with_row(head: str, name: str, row: str) -> str:
  """`head` with the summary row named `name` (its first cell: title and script) replaced by `row` (added
  at the table's end when absent; the table added when the file has none)."""
  lines = head.rstrip("\n").split("\n")
  header = md_row(SUMMARY_COLUMNS)
  if header not in lines:
    lines += ["", *md_table(SUMMARY_COLUMNS, []).split("\n")]
  start = lines.index(header) + 2
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  for i in range(start, end):
    if lines[i].split("|")[1].strip() == name.replace("|", "/"):
      lines[i] = row
      break
  else:
    lines.insert(end, row)
  return "\n".join(lines) + "\n"
