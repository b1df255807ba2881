"""Pure per-tensor merge kernels: (base tensor, [fine-tuned tensors], global stats, options) -> result.

The pytree API and the streaming checkpoint merge both call these and nothing else does the
math. Everything is computed in fp32 whatever the storage dtype (task vectors, norms, sums,
masks) and the merged tensor is cast to the storage dtype once, at the end. Each kernel is a
`jax.jit` with the options static (`KernelSpec`, hashable), so it compiles once per
(spec, size, dtype) and then runs for every tensor of that size: tensors arrive flattened to 1-D
(every operation is elementwise or a per-tensor reduction, so the layout does not matter). Host
inputs may arrive as 64-byte-aligned views that start a few entries early (`engine._aligned`: XLA
then uses their memory without a copy); the static `offsets` say where each input starts, so a
checkpoint whose shards have different header lengths compiles one variant per layout.

Padding: to split a tensor evenly over a mesh the engine may zero-pad the flat inputs past their
true size and pass it as the static `n`. A zero tail has τ = 0, which adds nothing to sums (norms,
DARE's L1 rescale, sign election, means) and never ranks above a true entry (per-tensor top-k,
with k from n); what would count it is masked (histograms, kept counts, ‖δ‖²), DARE masks are drawn
for the n true entries only, and the merged tensor is cut back to n entries. `n=None`: no padding.

Global statistics (`tensor_stats`, `low_histogram`) are per-tensor partial sums that the caller
accumulates over all tensors (in fp64 / int64 on the host):
  * squared task-vector norms ‖τ_i‖² (MetaGPT's λ_t),
  * an exact radix select of the global TIES threshold: |τ| ≥ 0 in fp32, so its IEEE bit
    pattern read as uint32 is monotone in the value. Pass 1 counts the top 16 bits (2¹⁵ bins,
    the sign bit is 0), which finds the bin holding the k-th smallest magnitude; pass 2 counts
    the low 16 bits of the entries in that bin, which pins the exact value. Memory: two
    histograms per model, independent of the model size.
"""
from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from merging.options import KernelSpec

F32 = jnp.float32
HI_BINS = 1 << 15   # top 16 bits of a non-negative fp32 (sign bit 0)
LO_BINS = 1 << 16


def _cut(base, models, offsets):
  """The inputs out of their aligned host views (`engine._aligned`): each from entry offsets[j] on,
  as many entries as the base has past its own offset. offsets: None (no cut) or (base, *models)."""
  if not offsets:
    return base, tuple(models)
  size = base.shape[0] - offsets[0]
  return base[offsets[0]:], tuple(m[k: k + size] for m, k in zip(models, offsets[1:]))


def _deltas(base, models):
  """θ_0 in fp32 and the task vectors τ_i = θ_i − θ_0, one array per model. A list, not a stacked
  [T, n]: T is small and static, and XLA on the CPU reduces a stack over T several times slower
  than T − 1 elementwise adds (TIES with a global threshold, 2.9M entries, 3 models: 261 → 49 ms)."""
  b = base.astype(F32)
  return b, [m.astype(F32) - b for m in models]


def _sum(xs):
  """Elementwise sum of a list of arrays, in list order."""
  return functools.reduce(jnp.add, xs)


ROW = 1024  # entries per row of `_sums`' first stage


def _sums(xs):
  """The sums of equally long 1-D arrays (each keeps its dtype), in one fused pass over their producers.

  A variadic reduce: XLA on the CPU gives every `jnp.sum` its own pass over a materialised fp32
  input, so a kernel's statistics cost more than its merge (7 sums over 4M entries: 44 ms; this:
  6 ms). Rows of `ROW` entries are summed first, then the row sums (a short sequential chain per
  row keeps fp32 rounding small); the tail past the last whole row is summed on its own.
  """
  n = xs[0].shape[0]
  whole = n - n % ROW

  def variadic(ys, axis):
    zeros = tuple(jnp.zeros((), y.dtype) for y in ys)
    return jax.lax.reduce(tuple(ys), zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (axis,))

  out = [jnp.zeros((), x.dtype) for x in xs]
  if whole:
    rows = variadic([x[:whole].reshape(-1, ROW) for x in xs], 1)
    out = [o + jnp.sum(r) for o, r in zip(out, rows)]
  if whole < n:
    out = [o + t for o, t in zip(out, variadic([x[whole:] for x in xs], 0))]
  return out


def _nonfinite(xs):
  """Count of NaN / Inf entries of each array (for `_sums`; zero: all finite)."""
  return [(~jnp.isfinite(x)).astype(jnp.int32) for x in xs]


def _bits(tau):
  return jax.lax.bitcast_convert_type(jnp.abs(tau), jnp.uint32)


def _valid(size, n):
  """Mask [size] of the true entries of inputs zero-padded past n; None without padding."""
  return None if n is None or n == size else jnp.arange(size) < n


def _bincounts(idx, length, valid):
  """Per-model counts [T, length] of the T index arrays idx; padding (outside `valid`) is not counted."""
  w = None if valid is None else valid.astype(jnp.int32)
  return jnp.stack([jnp.bincount(h, w, length=length) for h in idx])


@functools.partial(jax.jit, static_argnames=("histogram", "n", "offsets"))
def tensor_stats(base, models, *, histogram: bool = False, n: int | None = None, offsets: tuple | None = None):
  """Pass 1: {"sq": ‖τ_i‖² [T], "finite": [T+1] (base first), "hist": top-16-bit counts [T, 2¹⁵]}.
  `n`: the true size of zero-padded inputs (the padding is not counted); `offsets`: as `_cut`."""
  base, models = _cut(base, models, offsets)
  b, tau = _deltas(base, models)
  t_count = len(tau)
  sums = _sums([t * t for t in tau] + _nonfinite([b, *(m.astype(F32) for m in models)]))
  out = {"sq": jnp.stack(sums[:t_count]), "finite": jnp.stack(sums[t_count:]) == 0}
  if histogram:
    out["hist"] = _bincounts([(_bits(t) >> 16).astype(jnp.int32) for t in tau], HI_BINS, _valid(base.shape[0], n))
  return out


@functools.partial(jax.jit, static_argnames=("n", "offsets"))
def low_histogram(base, models, hi_bin, *, n: int | None = None, offsets: tuple | None = None):
  """Pass 2: counts [T, 2¹⁶] of the low 16 bits of |τ_i| among entries whose top bits equal hi_bin[i]
  (`n`, `offsets` as in `tensor_stats`)."""
  base, models = _cut(base, models, offsets)
  _, tau = _deltas(base, models)
  valid = _valid(base.shape[0], n)
  rows = []
  for i, t in enumerate(tau):
    bits = _bits(t)
    sel = (bits >> 16).astype(jnp.int32) == hi_bin[i]
    sel = jnp.where(sel if valid is None else sel & valid, (bits & 0xFFFF).astype(jnp.int32), LO_BINS)
    rows.append(jnp.bincount(sel, length=LO_BINS + 1)[:LO_BINS])
  return jnp.stack(rows)


@functools.lru_cache(maxsize=None)
def _seed_key(seed: int) -> jax.Array:
  return jax.random.key(seed)


_fold_in = jax.jit(jax.random.fold_in)  # one dispatch per tensor, not the ~1 ms of eager ops


def tensor_key(seed: int, name: str) -> jax.Array:
  """The DARE key of one tensor: a function of (seed, tensor name) only, so masks are reproducible."""
  return _fold_in(_seed_key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _keep_mask(key, i, keep, shape):
  return jax.random.bernoulli(jax.random.fold_in(key, i), keep, shape)


def dare_mask(seed: int, name: str, model_index: int, shape, keep: float) -> np.ndarray:
  """The DARE keep-mask `merge` uses for model `model_index` on tensor `name` (for tests and inspection)."""
  n = int(np.prod(shape))
  return np.asarray(_keep_mask(tensor_key(seed, name), model_index, keep, (n,))).reshape(shape)


def _rescale(tau, kept, how, keep):
  """DARE's rescale of the kept entries, per model (lists); keep: the keep probabilities."""
  if how == "inverse":
    return [k / F32(d) for k, d in zip(kept, keep)]
  if how == "l1":  # mergekit's rescaled_masked_tensor(norm=l1): per tensor and model
    out = []  # jnp.sum, not `_sums`: these scale every merged value, and a mesh's per-device order
    # matches jnp.sum's to the values' fp32 rounding, not `_sums`' rows (tests/test_merging_mesh.py)
    for t, k in zip(tau, kept):
      before, after = jnp.sum(jnp.abs(t)), jnp.sum(jnp.abs(k))
      scale = jnp.where((before < 1e-7) | (after < 1e-7), 1.0, before / jnp.where(after == 0, 1.0, after))
      out.append(k * scale)
    return out
  return kept


def kth_largest(mag, k: int):
  """Exact k-th largest of non-negative fp32 values by a two-pass radix select, O(n) (a full sort
  of a 30M-entry tensor is ~20x slower on CPU). Non-negative fp32 bit patterns order like values."""
  bits = _bits(mag)
  hi = (bits >> 16).astype(jnp.int32)
  hist = jnp.bincount(hi, length=HI_BINS)
  ge = jnp.cumsum(hist[::-1])[::-1]                    # ge[b] = #entries with top bits >= b
  b = jnp.max(jnp.where(ge >= k, jnp.arange(HI_BINS), -1))
  above = jnp.where(b + 1 < HI_BINS, ge[jnp.minimum(b + 1, HI_BINS - 1)], 0)
  lo = jnp.where(hi == b, (bits & 0xFFFF).astype(jnp.int32), LO_BINS)  # others to a spare bin: an
  hist_lo = jnp.bincount(lo, length=LO_BINS + 1)[:LO_BINS]              # unweighted count, 1.6x faster
  ge_lo = jnp.cumsum(hist_lo[::-1])[::-1]
  l = jnp.max(jnp.where(ge_lo >= k - above, jnp.arange(LO_BINS), -1))
  return jax.lax.bitcast_convert_type(((b << 16) | l).astype(jnp.uint32), F32)


def _sparsify(tau, spec: KernelSpec, thresholds, key, n: int):
  """Step 1: (τ̂, keep masks), one per model; n: the true entries (the rest is zero padding)."""
  size = tau[0].shape[0]
  if spec.sparsify == "none":
    return tau, [jnp.ones((size,), bool)] * len(tau)
  if spec.sparsify == "magnitude":
    mags = [jnp.abs(t) for t in tau]
    if spec.trim == "global":
      thr = [thresholds[i] for i in range(len(tau))]
    else:  # k-th largest magnitude of the tensor, k = max(1, int(density·n)), as mergekit; the
      # padding's |τ| = 0 ranks below every true entry, so it cannot move the k-th largest (k <= n)
      thr = [kth_largest(m, max(1, int(d * n))) if d < 1 else F32(0) for m, d in zip(mags, spec.keep)]
    masks = [m >= t for m, t in zip(mags, thr)]
  else:  # random: DARE, keep with probability 1 − p; drawn for the n true entries (the padding,
    # never kept, does not move them in the random stream)
    masks = [_keep_mask(key, i, d, (n,)) if d < 1 else jnp.ones((n,), bool) for i, d in enumerate(spec.keep)]
    if n < size:
      masks = [jnp.pad(m, (0, size - n)) for m in masks]
  kept = [jnp.where(m, t, 0.0) for m, t in zip(masks, tau)]
  return _rescale(tau, kept, spec.rescale, spec.keep), masks


def _combine(tau_hat, weights, spec: KernelSpec):
  """Steps 2-3: (δ, agree masks per model)."""
  u = [weights[i] * t for i, t in enumerate(tau_hat)]
  if spec.consensus:
    v = u if spec.vote == "weighted" else tau_hat
    gamma = jnp.where(_sum(v) >= 0, 1.0, -1.0)
    agree = [jnp.sign(x) == gamma for x in v]
  else:
    agree = [jnp.ones(u[0].shape, bool)] * len(u)
  mixed = _sum([jnp.where(a, x, 0.0) for a, x in zip(agree, u)])
  if spec.normalize == "count":
    mixed = mixed / jnp.maximum(_sum([a.astype(jnp.int32) for a in agree]), 1).astype(F32)
  elif spec.normalize == "weight":
    d = _sum([jnp.where(a, weights[i], 0.0) for i, a in enumerate(agree)])
    d = jnp.where(d == 0, 1.0, d) if spec.consensus else jnp.where(jnp.abs(d) < 1e-8, 1.0, d)
    mixed = mixed / d
  return mixed, agree


def _weighted_sum(base, models, weights, lam, spec: KernelSpec, out_dtype):
  """Task arithmetic / MetaGPT without sparsification: θ_0 + λ Σ_i w_i τ_i / D, one model at a time.

  Same result and statistics as the general path, without materialising the [T, n] stack of task
  vectors and masks (the general path is several times slower on CPU for this, the common case).
  """
  b = base.astype(F32)
  acc = jnp.zeros_like(b)
  tau = []
  for i, m in enumerate(models):
    tau.append(m.astype(F32) - b)
    acc = acc + weights[i] * tau[-1]
  if spec.normalize == "count":
    acc = acc / F32(len(models))
  elif spec.normalize == "weight":
    d = jnp.sum(weights)
    acc = acc / jnp.where(jnp.abs(d) < 1e-8, 1.0, d)
  merged32 = b + acc * lam
  merged = merged32.astype(out_dtype)
  return merged, _merge_stats(b, models, tau, [(t != 0).astype(jnp.int32) for t in tau], merged32 - b, merged)


def _merge_stats(b, models, tau, contributes, delta, merged):
  """A merged tensor's statistics (`merge_tensor`) in one `_sums` pass; contributes: int32 0/1 per model;
  merged: the result in its storage dtype, whose NaN / Inf entries (an overflow of the cast) are counted."""
  t_count = len(tau)
  sums = _sums([t * t for t in tau] + _nonfinite([b, *(m.astype(F32) for m in models)]) + contributes
               + [jnp.square(delta)] + _nonfinite([merged]))
  return {"sq": jnp.stack(sums[:t_count]), "finite": jnp.stack(sums[t_count: 2 * t_count + 1]) == 0,
          "kept": jnp.stack(sums[2 * t_count + 1: -2]), "delta_sq": sums[-2], "out_nonfinite": sums[-1]}


@functools.partial(jax.jit, static_argnames=("spec", "n", "offsets"))
def merge_tensor(base, models, weights, lam, thresholds, key, *, spec: KernelSpec, n: int | None = None,
                 offsets: tuple | None = None):
  """One merged tensor and its statistics.

  base: the θ_0 tensor, flattened; models: tuple of T flattened θ_i tensors of its size;
  weights: w_i [T] fp32; lam: λ; thresholds: global TIES thresholds [T] (unused unless spec.trim == "global");
  key: the tensor's DARE key (`tensor_key`); n: the true size of zero-padded inputs (the merged
  tensor has n entries, the statistics cover them only); offsets: as `_cut`. Returns (merged in the storage dtype,
  {"kept": entries of each model that contribute [T], "delta_sq": ‖merged − θ_0‖² in fp32,
  "sq": ‖τ_i‖² [T], "finite": [T+1] (inputs without NaN / Inf), "out_nonfinite": NaN / Inf entries of
  the merged tensor in its storage dtype}).
  """
  base, models = _cut(base, models, offsets)
  out_dtype = jnp.dtype(spec.out_dtype) if spec.out_dtype else base.dtype
  valid = _valid(base.shape[0], n)
  if spec.mode != "linear" and spec.sparsify == "none" and not spec.consensus:
    merged, stats = _weighted_sum(base, models, weights, lam, spec, out_dtype)  # τ = 0 on padding: no term
    return (merged if valid is None else merged[:n]), stats
  b, tau = _deltas(base, models)
  if spec.mode == "linear":  # Σ w_i θ_i / Σ w_i
    merged32 = _sum([weights[i] * m.astype(F32) for i, m in enumerate(models)]) / jnp.sum(weights)
    contributes = [jnp.broadcast_to(weights[i] != 0, b.shape) for i in range(len(models))]
  else:
    tau_hat, mask = _sparsify(tau, spec, thresholds, key, base.shape[0] if n is None else n)
    mixed, agree = _combine(tau_hat, weights, spec)
    merged32 = b + mixed * lam
    contributes = [m & a & (t != 0) for m, a, t in zip(mask, agree, tau_hat)]
  delta = merged32 - b
  if valid is not None:  # "linear" counts every entry of a weighted model
    contributes, delta = [c & valid for c in contributes], jnp.where(valid, delta, 0.0)
  merged = merged32.astype(out_dtype)
  stats = _merge_stats(b, models, tau, [c.astype(jnp.int32) for c in contributes], delta, merged)
  return (merged if valid is None else merged[:n]), stats
