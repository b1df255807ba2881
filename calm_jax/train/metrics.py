"""Metrics as JSONL (grep-able) and TensorBoard event files; only process 0 writes."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from calm_jax.errors import UserError


class NonFiniteError(UserError, FloatingPointError):
  """A NaN or Inf in training metrics: the run stops with this message."""


def check_finite(step: int, metrics: dict, nonfinite_params: int = 0) -> None:
  """Stops the run before a non-finite state is logged as fine or checkpointed."""
  bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
  if nonfinite_params:
    bad["non-finite parameter entries"] = nonfinite_params
  if bad:
    raise NonFiniteError(f"non-finite metrics at step {step}: {bad}; stopping before this state is saved "
                         "(lower the learning rate, check the data, or enable gradient clipping)")


class MetricWriter:
  def __init__(self, workdir, tensorboard: bool = True):
    self.main = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self.tb = None
    if self.main:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(Path(workdir) / "tb"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.main:
      return
    row = {"step": int(step), "time": time.time()}
    for k, v in metrics.items():
      row[k] = float(np.asarray(v)) if np.ndim(v) == 0 else np.asarray(v).tolist()
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and isinstance(v, float):
          self.tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
