"""Workdirs: a run's directory is one of ours, locked while it runs, and it knows what it was.

A workdir handed to `launch.train` (or to the trainer) must be new, empty, or a run of ours
(`RUN_FILE`, or the files an older run of ours left); anything else — a model directory, a
dataset, someone's home — is refused naming what it holds, never written into. While a run works
in it, the workdir is locked (`calm_jax.atomic.exclusive`): a second run there fails at once.

What a run *is* (`identity`): its config without the keys that only say how to run it (logging,
evaluation, checkpoint cadence, mesh). A checkpoint records it, and a run resumes only if its
identity is the one recorded, else it is refused naming the keys that differ (`resume_with_changes`
overrides that, and the workdir records it); a finished run is reused only on the same terms.
"""
from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

from calm_jax.atomic import OutputError, atomic_write_text, exclusive
from calm_jax.errors import UserError

RUN_FILE = "calm_jax_run.json"
# Config keys (at any depth) that do not change what a run computes.
VOLATILE = frozenset({"log_every", "eval_every", "tensorboard", "checkpoint", "quiet", "eval", "mesh", "rules",
                      "reuse", "resume_with_changes", "progress"})


class RunMismatchError(UserError):
  """A workdir holds a run of another config than this one."""


def identity(config) -> dict:
  """The config as {dotted key: value} without the VOLATILE keys: what defines a run's result."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if k in VOLATILE:
        continue
      key = f"{prefix}{k}"
      if isinstance(v, dict) and v:
        walk(v, key + ".")
      else:
        out[key] = json.loads(json.dumps(v, default=str))  # tuples -> lists, as stored
  walk(d, "")
  return out


def differences(old: dict, new: dict) -> list[str]:
  """'key: recorded X, now Y' for every key whose value differs (or exists on one side only)."""
  keys = sorted(set(old) | set(new))
  return [f"{k}: recorded {old.get(k, '(absent)')!r}, now {new.get(k, '(absent)')!r}" for k in keys
          if old.get(k, "(absent)") != new.get(k, "(absent)")]


def describe(entries: list[str]) -> str:
  """What a directory that is not one of our runs looks like, for the error message."""
  names = set(entries)
  if "config.json" in names and ({"model.safetensors", "model.safetensors.index.json"} & names
                                 or any(n.endswith(".safetensors") for n in names)):
    return " (a Hugging Face model directory)"
  if "adapter_config.json" in names:
    return " (an adapter directory)"
  return ""


def is_our_run(workdir: Path) -> bool:
  """A run of ours: our marker, or what runs of ours wrote before the marker existed (a config.json
  with a `method` beside metrics or checkpoints)."""
  if (workdir / RUN_FILE).exists():
    return True
  try:
    method = json.loads((workdir / "config.json").read_text()).get("method")
  except (OSError, ValueError, AttributeError):
    return False
  return method is not None and any((workdir / n).exists() for n in ("metrics.jsonl", "checkpoints", "results.json"))


def check_workdir(workdir) -> Path:
  """The workdir if it is new, empty or one of our runs; else an error naming what it holds."""
  workdir = Path(workdir).absolute()
  if not workdir.exists():
    return workdir
  if not workdir.is_dir():
    raise OutputError(f"workdir {workdir} is a file, not a directory")
  entries = sorted(p.name for p in workdir.iterdir() if not p.name.startswith("."))
  if entries and not is_our_run(workdir):
    shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
    raise OutputError(f"workdir {workdir} holds {shown}{describe(entries)}, which is not a run of ours; "
                      "nothing was written: choose a new or empty --workdir")
  return workdir


@contextlib.contextmanager
def run_in_workdir(workdir, config):
  """Checks and locks `workdir` for a run of `config`, and marks it as one of ours, for the block."""
  workdir = check_workdir(workdir)
  with exclusive(workdir, what="workdir"):
    check_workdir(workdir)  # again, under the lock
    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / RUN_FILE
    if not marker.exists():
      atomic_write_text(marker, json.dumps({"method": config.get("method", ""),
                                            "created": datetime.datetime.now(datetime.timezone.utc).isoformat()},
                                           indent=2))
    yield workdir


def check_finished(workdir, config, what: str = "run") -> None:
  """Before reusing a finished run in `workdir` (its artifact exists): the identity its trainer
  recorded is this config's, else `RunMismatchError` naming the differing keys."""
  meta_path = Path(workdir) / "checkpoints" / "meta.json"
  try:
    recorded = json.loads(meta_path.read_text()).get("config")
  except (OSError, ValueError):
    return  # nothing recorded (a run from before identities were kept): nothing to compare
  if recorded is None:
    return
  diff = differences(recorded, identity(config))
  if diff:
    raise RunMismatchError(f"{Path(workdir)} holds a finished {what} of another config ({'; '.join(diff[:8])}"
                           f"{'; ...' if len(diff) > 8 else ''}); use a fresh workdir, or delete it to retrain")
