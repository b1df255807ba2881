"""The merge report: what was merged, with which weights, and per-tensor statistics.

`merge_report.json` in a streamed output and the second value `merge` returns. Keys:
  method, options (resolved, conventions included), models (where they came from),
  weights (w_i the kernels used; MetaGPT: λ_t), lambdas (MetaGPT), sq_norms (‖τ_i‖² over the
  merged tensors), ties_threshold (global trim), vocab (tensors whose vocab size differs and the
  policy applied), kept_fraction (per model, over the merged tensors), tensors
  ({name: {merged, reason | numel, kept: [fraction per model], delta_norm: ‖θ − θ_0‖, sq_norm: [‖τ_i‖²]}}).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


class Report:
  def __init__(self, opts, plans, models=None):
    self.opts = opts
    self.data = {
        "method": opts.method,
        "options": opts.as_dict(),
        "models": list(models) if models else [f"model {i}" for i in range(opts.num_models)],
        "weights": list(opts.weights),
        "vocab": {p.name: p.vocab for p in plans if p.vocab is not None},
        "tensors": {p.name: {"merged": False, "reason": p.reason} if not p.merge else
                    {"merged": True, "numel": math.prod(p.shape)} for p in plans},
    }
    self._sq_pass = None
    self._sq_merge = np.zeros(opts.num_models, np.float64)
    self._kept = np.zeros(opts.num_models, np.int64)
    self._numel = 0

  def set_models(self, models) -> None:
    self.data["models"] = [str(m) for m in models]

  def global_sq_norms(self, sq) -> None:
    self._sq_pass = np.asarray(sq, np.float64)

  def metagpt(self, lambdas) -> None:
    self.data["lambdas"] = [float(x) for x in lambdas]
    self.data["weights"] = [float(np.float32(x)) for x in lambdas]

  def ties_threshold(self, thresholds, ranks, count) -> None:
    self.data["ties_threshold"] = {"thresholds": [float(t) for t in thresholds], "ranks": [int(r) for r in ranks],
                                   "entries_per_model": int(count), "exact": True}

  def tensor(self, plan, stats) -> None:
    n = math.prod(plan.shape)
    self._sq_merge += stats["sq"]
    self._kept += np.asarray(stats["kept"], np.int64)
    self._numel += n
    self.data["tensors"][plan.name].update(
        kept=[float(k) / n for k in stats["kept"]], delta_norm=float(np.sqrt(stats["delta_sq"])),
        sq_norm=[float(s) for s in stats["sq"]])

  def to_dict(self) -> dict:
    d = dict(self.data)
    sq = self._sq_pass if self._sq_pass is not None else self._sq_merge
    d["sq_norms"] = [float(s) for s in sq]
    d["merged_params_per_model"] = self._numel
    d["kept_fraction"] = [float(k) / max(self._numel, 1) for k in self._kept]
    return d

  def write(self, path) -> None:
    Path(path).write_text(json.dumps(self.to_dict(), indent=2))
