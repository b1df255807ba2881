"""Host-side global statistics accumulated over tensors: MetaGPT's λ and the global TIES threshold.

Per-tensor partial results come from `merging.kernels` (fp32 per tensor); they are summed here in
fp64 (norms) and int64 (histogram counts), so models with more than 2³¹ parameters are fine.
"""
from __future__ import annotations

import numpy as np

from merging.kernels import HI_BINS, LO_BINS


def metagpt_lambdas(sq_norms) -> np.ndarray:
  """λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² (MetaGPT Eq. 15). All-zero task vectors give equal λ's (nothing to weigh)."""
  sq = np.asarray(sq_norms, np.float64)
  total = sq.sum()
  return np.full_like(sq, 1.0 / len(sq)) if total == 0 else sq / total


def ties_rank(num_entries: int, density: float) -> int:
  """The original TIES code's rank: the k-th smallest |τ| (1-indexed), k = d − int(d·density); 0 keeps all."""
  return 0 if density >= 1 else num_entries - int(num_entries * density)


class ThresholdSearch:
  """Exact k-th smallest |τ| per model from two histogram passes (radix select on fp32 bits)."""

  def __init__(self, num_models: int):
    self.hi = np.zeros((num_models, HI_BINS), np.int64)
    self.lo = np.zeros((num_models, LO_BINS), np.int64)
    self.count = 0

  def add_hi(self, counts, numel: int) -> None:
    self.hi += np.asarray(counts, np.int64)
    self.count += numel

  def hi_bins(self, ranks) -> tuple[np.ndarray, np.ndarray]:
    """(top-16-bit bin of each model's k-th smallest, rank left inside that bin)."""
    bins, rest = [], []
    for row, k in zip(self.hi, ranks):
      c = np.cumsum(row)
      b = int(np.searchsorted(c, max(k, 1)))
      bins.append(b)
      rest.append(max(k, 1) - (int(c[b - 1]) if b else 0))
    return np.asarray(bins, np.int32), np.asarray(rest, np.int64)

  def add_lo(self, counts) -> None:
    self.lo += np.asarray(counts, np.int64)

  def thresholds(self, ranks, bins, rest) -> np.ndarray:
    """fp32 thresholds; rank 0 (keep everything) gives 0."""
    out = []
    for row, k, b, r in zip(self.lo, ranks, bins, rest):
      if k == 0:
        out.append(0)
        continue
      low = int(np.searchsorted(np.cumsum(row), r))
      out.append((int(b) << 16) | low)
    return np.asarray(out, np.uint32).view(np.float32)
