"""Merge methods as presets of one generalized task-arithmetic recipe, and their conventions.

Every method is the same four steps over task vectors τ_i = θ_i − θ_0 (mergekit's "GTA" view):

  1. sparsify  τ̂_i = S(τ_i): none, magnitude trim (TIES) or random drop (DARE), optionally rescaled;
  2. elect     γ = sign(Σ_i v_i) with v_i = τ̂_i (vote="unweighted") or w_i τ̂_i (vote="weighted");
               agree_i = [sign(v_i) = γ]  (TIES / DARE-TIES only; zeros never agree, Σ = 0 counts as +);
  3. combine   δ = Σ_i w_i τ̂_i agree_i / D,  D = 1 | #agree (normalize="count") | Σ_i w_i agree_i ("weight");
  4. scale     θ = θ_0 + λ δ.

`average` is the plain weighted mean Σ w_i θ_i / Σ w_i (needs no task vectors). `metagpt` sets
w_t = λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² (arXiv 2406.11385, Eq. 15) with the norms over *all* selected
parameters of the model (one scalar per model, not per tensor), λ = 1, D = 1: θ = θ_0 + Σ λ_t τ_t.
With `sparsify="ties"|"dare"` it sparsifies (for TIES: trims and elects signs; paper convention
on the unweighted vectors, mergekit's on λ_t τ̂_t) first and then weights by λ_t with D = 1, as the
brief prescribes (mergekit `ties` with `weight: λ_t` and its default `normalize: true` is
`normalize="weight"`, which re-normalizes λ wherever models disagree). The λ_t are computed from the
**original** task vectors (what the paper's derivation uses; the reference notes recommend it),
never from the sparsified ones, so the weights do not depend on the DARE seed.

Conventions (`convention="paper"` is the default; "mergekit" reproduces mergekit >= 0.1;
docs/merging.md has the same as a table):

  TIES trim     paper: global per model, keep |τ| >= the k-th smallest magnitude over all the
                model's selected entries, k = d − int(d·density) (ties kept; the original code).
                mergekit: per tensor, keep |τ| >= the tensor's k-th largest magnitude,
                k = max(1, int(density·n)) (mergekit keeps exactly k, ordering ties by argsort).
  TIES vote     paper: on the unweighted trimmed vectors. mergekit: on w_i τ̂_i (issue #474).
  TIES combine  paper: disjoint mean (÷ #agree). mergekit: ÷ Σ_i w_i agree_i (`normalize: true`).
  DARE rescale  paper: τ·m / (1 − p). mergekit: τ·m · ‖τ‖₁ / ‖τ·m‖₁ per tensor (skipped when
                either norm < 1e-7).
  DARE-TIES     paper: disjoint mean. mergekit: sum of the agreeing entries (`normalize: false`).

Each step can also be set on its own (`trim`, `vote`, `normalize`, `rescale`). One deviation from
the TIES code: where Σ_i v_i is exactly 0 the elected sign is + (mergekit's rule) instead of the
model-wide majority sign; this only matters on exact cancellation of non-zero entries.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

from calm_jax.errors import UserError

METHODS = ("average", "task_arithmetic", "ties", "dare", "dare_ties", "metagpt")
CONVENTIONS = ("paper", "mergekit")
VOCAB_POLICIES = ("truncate", "exclude")
# HF names (model.embed_tokens.weight, lm_head.weight) and our pytree names (embed, lm_head).
DEFAULT_VOCAB_REGEX = r"(^|[./])(embed_tokens|embed|lm_head|wte)([./]weight)?$"


class MergeError(UserError):
  """Inputs that cannot be merged, or options that do not make sense."""


# (sparsify, trim, consensus, vote, normalize, rescale) per method and convention.
_PRESETS = {
    ("task_arithmetic", "paper"): ("none", "tensor", False, "weighted", "none", "none"),
    ("ties", "paper"): ("magnitude", "global", True, "unweighted", "count", "none"),
    ("ties", "mergekit"): ("magnitude", "tensor", True, "weighted", "weight", "none"),
    ("dare", "paper"): ("random", "tensor", False, "weighted", "none", "inverse"),
    ("dare", "mergekit"): ("random", "tensor", False, "weighted", "none", "l1"),
    ("dare_ties", "paper"): ("random", "tensor", True, "unweighted", "count", "inverse"),
    ("dare_ties", "mergekit"): ("random", "tensor", True, "weighted", "none", "l1"),
}
_PRESETS[("task_arithmetic", "mergekit")] = _PRESETS[("task_arithmetic", "paper")]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """The static part of the per-tensor kernel (hashable: one compile per spec and shape)."""
  mode: str = "task"               # "task" (steps 1-4 above) | "linear" (Σ w θ / Σ w)
  sparsify: str = "none"           # "none" | "magnitude" | "random"
  trim: str = "tensor"             # "global" (thresholds from a stats pass) | "tensor"
  keep: tuple[float, ...] = ()     # per model: magnitude density / DARE keep probability 1 − p
  rescale: str = "none"            # "none" | "inverse" (÷ keep) | "l1"
  consensus: bool = False
  vote: str = "weighted"           # "weighted" | "unweighted"
  normalize: str = "none"          # "none" | "count" | "weight"
  out_dtype: str | None = None     # None: the base tensor's dtype

  @property
  def elementwise(self) -> bool:
    """Each merged entry depends only on the same entry of the inputs (and global statistics), so a
    tensor can be merged in pieces. Not so for a per-tensor trim (the tensor's k-th largest |τ|) or
    DARE (one random stream per tensor)."""
    return self.sparsify == "none" or (self.sparsify == "magnitude" and self.trim == "global")


@dataclasses.dataclass(frozen=True)
class MergeOptions:
  """Resolved options of one merge (what the report records)."""
  method: str
  convention: str
  num_models: int
  weights: tuple[float, ...]       # w_i (MetaGPT: replaced by λ_t after the stats pass)
  lam: float                       # λ, the final scale
  density: tuple[float, ...]       # TIES keep fraction per model
  drop_rate: tuple[float, ...]     # DARE drop probability p per model
  sparsify: str                    # MetaGPT's "none" | "ties" | "dare"; the method's own otherwise
  trim: str
  vote: str
  normalize: str
  rescale: str
  seed: int
  include: tuple[str, ...]
  exclude: tuple[str, ...]
  vocab_policy: str
  vocab_regex: str
  out_dtype: str | None
  kernel: KernelSpec

  @property
  def needs_norms(self) -> bool:
    return self.method == "metagpt"

  @property
  def needs_threshold(self) -> bool:
    return self.kernel.sparsify == "magnitude" and self.kernel.trim == "global" and min(self.kernel.keep) < 1

  def selected(self, name: str) -> bool:
    """Include/exclude regexes (re.search) over the tensor's name; unselected tensors keep the base value."""
    if self.include and not any(re.search(p, name) for p in self.include):
      return False
    return not any(re.search(p, name) for p in self.exclude)

  def is_vocab(self, name: str) -> bool:
    return re.search(self.vocab_regex, name) is not None

  def as_dict(self) -> dict[str, Any]:
    """The options that matter for this method (for the report)."""
    d = dataclasses.asdict(self)
    k = d.pop("kernel")
    unused = set()
    if k["sparsify"] != "magnitude":
      unused |= {"density", "trim"}
    if k["sparsify"] != "random":
      unused |= {"drop_rate", "seed"}
    if not k["consensus"]:
      unused.add("vote")
    if self.method == "metagpt":
      unused.add("weights")
    if self.method == "average":
      unused |= {"lam", "normalize", "rescale", "convention", "sparsify"}
    return {key: v for key, v in d.items() if key not in unused}


def _number(name, value) -> float:
  """A finite float, or a MergeError naming the option (NaN and Inf weights would poison every tensor)."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise MergeError(f"{name}={value!r}: expected a number") from None
  if not math.isfinite(x):
    raise MergeError(f"{name}={value!r}: must be a finite number")
  return x


def _per_model(name, value, n) -> tuple[float, ...]:
  values = [value] * n if isinstance(value, (int, float, str)) else list(value)
  if len(values) != n:
    raise MergeError(f"{name}: {len(values)} values for {n} models")
  return tuple(_number(f"{name}[{i}]" if n > 1 else name, v) for i, v in enumerate(values))


def _strings(name, value) -> tuple[str, ...]:
  if value is None or value == "":
    return ()
  vals = (value,) if isinstance(value, str) else tuple(value)
  for v in vals:
    try:
      re.compile(v)
    except re.error as e:
      raise MergeError(f"{name}: bad regex {v!r}: {e}") from None
  return vals


def _choice(name, value, allowed):
  if value not in allowed:
    raise MergeError(f"{name}={value!r}: expected one of {', '.join(map(str, allowed))}")
  return value


def resolve(method: str, num_models: int, *, weights: Sequence[float] | float | None = None, lam: float = 1.0,
            density: Sequence[float] | float = 0.2, drop_rate: Sequence[float] | float = 0.5,
            sparsify: str | None = None, convention: str = "paper", trim: str | None = None,
            vote: str | None = None, normalize: str | None = None, rescale: str | None = None, seed: int = 0,
            include=None, exclude=None, vocab_policy: str = "truncate", vocab_regex: str = DEFAULT_VOCAB_REGEX,
            out_dtype: str | None = None) -> MergeOptions:
  """Validates user options against a method and fills in its convention's defaults."""
  _choice("method", method, METHODS)
  _choice("convention", convention, CONVENTIONS)
  _choice("vocab_policy", vocab_policy, VOCAB_POLICIES)
  if num_models < 1:
    raise MergeError("no fine-tuned models to merge")
  if method == "metagpt" and weights is not None:
    raise MergeError("metagpt computes its weights (λ_t ∝ ‖τ_t‖²); do not pass weights")
  if sparsify not in (None, "none") and method != "metagpt":
    raise MergeError(f"sparsify={sparsify!r} is for metagpt; method {method!r} has its own")
  density = _per_model("density", density, num_models)
  drop_rate = _per_model("drop_rate", drop_rate, num_models)
  if not all(0 < d <= 1 for d in density):
    raise MergeError(f"density must be in (0, 1], got {density}")
  if not all(0 <= p < 1 for p in drop_rate):
    raise MergeError(f"drop_rate must be in [0, 1), got {drop_rate}")
  w = _per_model("weights", 1.0 if weights is None else weights, num_models)
  lam = _number("lam", lam)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise MergeError(f"seed={seed!r}: expected an integer >= 0")
  if method == "average" and sum(w) == 0:
    raise MergeError(f"average: the weights {w} sum to 0")

  if method == "metagpt":
    sparsify = _choice("sparsify", sparsify or "none", ("none", "ties", "dare"))
    base = {"none": "task_arithmetic", "ties": "ties", "dare": "dare"}[sparsify]
    sp, tr, cons, vt, nm, rs = _PRESETS[(base, convention)]
    nm = "none"  # θ_0 + Σ λ_t τ̂_t: the λ's already sum to 1
    vt = "unweighted" if sparsify == "ties" and convention == "paper" else vt
  elif method == "average":
    sparsify, (sp, tr, cons, vt, nm, rs) = "none", _PRESETS[("task_arithmetic", convention)]
  else:
    sparsify = {"ties": "ties", "dare": "dare", "dare_ties": "dare"}.get(method, "none")
    sp, tr, cons, vt, nm, rs = _PRESETS[(method, convention)]
  tr = _choice("trim", trim or tr, ("global", "tensor"))
  vt = _choice("vote", vote or vt, ("weighted", "unweighted"))
  nm = _choice("normalize", normalize or nm, ("none", "count", "weight"))
  rs = _choice("rescale", rescale or rs, ("none", "inverse", "l1"))
  if rs == "inverse" and sp != "random":
    raise MergeError("rescale='inverse' (÷ (1 − p)) applies to DARE only; use 'l1' or 'none'")
  keep = density if sp == "magnitude" else tuple(1 - p for p in drop_rate) if sp == "random" else ()
  if out_dtype is not None:
    _choice("out_dtype", out_dtype, ("float32", "bfloat16", "float16"))
  kernel = KernelSpec(mode="linear" if method == "average" else "task", sparsify=sp, trim=tr, keep=keep,
                      rescale=rs, consensus=cons, vote=vt, normalize=nm, out_dtype=out_dtype)
  return MergeOptions(method=method, convention=convention, num_models=num_models, weights=w, lam=float(lam),
                      density=density, drop_rate=drop_rate, sparsify=sparsify, trim=tr, vote=vt, normalize=nm,
                      rescale=rs, seed=int(seed), include=_strings("include", include),
                      exclude=_strings("exclude", exclude), vocab_policy=vocab_policy, vocab_regex=vocab_regex,
                      out_dtype=out_dtype, kernel=kernel)


def option_names() -> tuple[str, ...]:
  import inspect
  return tuple(p for p in inspect.signature(resolve).parameters if p not in ("method", "num_models"))


def resolve_checked(method: str, num_models: int, options: dict) -> MergeOptions:
  """`resolve` with a clear error for an unknown option name (a typo must not be ignored)."""
  unknown = sorted(set(options) - set(option_names()))
  if unknown:
    raise MergeError(f"unknown merge option(s) {', '.join(unknown)}; known: {', '.join(option_names())}")
  return resolve(method, num_models, **options)
