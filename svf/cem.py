"""Cross-entropy method (CEM) over mixing coefficients, as Transformer²'s few-shot adaptation runs it.

Each iteration samples a population around the current mean (Gaussian, clamped to [lo, hi]),
the incumbent best is always member 0 (elitism), the whole population is scored by one call
of `fitness` (a jitted, vmapped function in practice), and mean / std are refit to the elites.
Fitness is maximised lexicographically: primary score, then the tie-break (accuracy on the
few-shot prompts, then the mean log-likelihood of their correct answers).
Defaults are the paper's: population 32, 6 elites (ratio 0.2), initial mean 1/K, spread 0.5.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class CEMResult(NamedTuple):
  best: np.ndarray          # [dim]
  score: tuple[float, float]
  history: list[dict]       # per iteration: best primary / tie-break, mean, std


def cem(fitness: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], dim: int, *, iters: int, seed: int = 0,
        pop: int = 32, elites: int = 6, init_mean: float | np.ndarray = 0.5, init_std: float = 0.5,
        lo: float = 0.0, hi: float = 1.0) -> CEMResult:
  """Maximises fitness(population [pop, dim]) -> (primary [pop], tie_break [pop])."""
  if dim < 1:
    raise ValueError(f"CEM needs at least one coefficient, got dim={dim} (K=0 experts?)")
  if not 1 <= elites <= pop:
    raise ValueError(f"CEM needs 1 <= elites <= population, got elites={elites}, population={pop}")
  if iters < 1:
    raise ValueError(f"CEM needs iters >= 1, got {iters}")
  rng = np.random.default_rng(seed)
  mean = np.broadcast_to(np.asarray(init_mean, np.float64), (dim,)).copy()
  std = np.full(dim, float(init_std))
  best, best_score = None, (-np.inf, -np.inf)
  history = []
  for _ in range(iters):
    x = np.clip(mean + std * rng.standard_normal((pop, dim)), lo, hi)
    if best is not None:
      x[0] = best
    primary, tie = (np.asarray(a, np.float64) for a in fitness(x.astype(np.float32)))
    order = np.lexsort((-tie, -primary))  # best first: primary, then tie-break
    top = x[order[:elites]]
    mean, std = top.mean(axis=0), top.std(axis=0)
    score = (float(primary[order[0]]), float(tie[order[0]]))
    if score > best_score:
      best, best_score = x[order[0]].copy(), score
    history.append({"primary": best_score[0], "tie_break": best_score[1], "mean": mean.tolist(), "std": std.tolist()})
  return CEMResult(best, best_score, history)
