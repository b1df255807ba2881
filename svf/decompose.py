"""Full-rank (thin) SVD of the SVF target matrices, fp32, vmapped over stacked layers, cached on disk.

Targets are the decoder's per-layer projections selected by a regex over their stacked names
(`layers/q|k|v|o|gate|up|down`). Each is viewed as a matrix [L, rows, cols] in our [in, out]
layout (q/k/v: [E, H·D]; o: [H·D, E]); W = U·diag(σ)·Vᵀ with U [L, rows, k], σ [L, k],
V [L, cols, k], k = min(rows, cols). Matrices of one shape (up to a transpose: down = [F, E] is
decomposed as its transpose [E, F] with U and V swapped back) go through one jitted, vmapped
`jnp.linalg.svd`, so all MLP matrices of a model are a single call. With a mesh, the stacked
layer axis is split over its devices (SPMD, one slice of layers per device).

Two algorithms (`algorithm`): "lapack" (default; LAPACK's divide-and-conquer `gesdd` through
`jnp.linalg.svd`, what torch.linalg.svd runs too) and "gram": eigh of the small Gram matrix
WᵀW (cols × cols) gives V in one symmetric eigensolve, then σ_i = ‖W·v_i‖ and U = W·V/σ, except
for the `GRAM_REFINE` smallest directions, whose eigenvectors the Gram's squared condition number
mixes: those come from an exact SVD of W·V restricted to them (rows × 64). About 2-2.5× faster
on CPU, σ as accurate as LAPACK's (benchmarks/svd.py: within 1.3e-6 of torch's; 5e-7 of an fp64
SVD on random square matrices, LAPACK 9e-7), W rebuilt to ~2e-7, V orthonormal. The price: U
columns of small σ_i just above that block are orthonormal only to ~1e-2 on square matrices
(1e-6 on the MLP's [2048, 768]). An SVF update U·diag(σ⊙m)·Vᵀ = W·V·diag(m)·Vᵀ does not depend
on it, so for SVF it is a sound speed/accuracy trade; measured in benchmarks/svd.py.

The cache file is keyed by the base parameters' content fingerprint, the target regex and the
algorithm (`svd-<fingerprint>-<hash>.safetensors` under the cache dir), written to a temporary
name and renamed into place, so the decomposition runs once per base and target set.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.fingerprint import fingerprint

CANDIDATES = ("q", "k", "v", "o", "gate", "up", "down")
# Named presets; anything else is taken as a regex over "layers/<name>".
PRESETS = {"mlp": r"layers/(gate|up|down)", "attention": r"layers/(q|k|v|o)",
           "both": r"layers/(q|k|v|o|gate|up|down)"}


class Factors(NamedTuple):
  """W[l] = u[l] @ diag(s[l]) @ v[l].T for every stacked layer l (fp32)."""
  u: jax.Array  # [L, rows, k]
  s: jax.Array  # [L, k]
  v: jax.Array  # [L, cols, k]


def target_regex(targets: str) -> str:
  return PRESETS.get(targets, targets)


def select_targets(param_names, targets: str) -> list[str]:
  """Stacked parameter names ("layers/gate", ...) the regex (or preset) fully matches."""
  regex = target_regex(targets)
  try:
    pat = re.compile(regex)
  except re.error as e:
    raise ValueError(f"SVF target regex {regex!r} is not a valid regex: {e}") from None
  candidates = [f"layers/{c}" for c in CANDIDATES if f"layers/{c}" in set(param_names)]
  chosen = [n for n in candidates if pat.fullmatch(n)]
  if not chosen:
    raise ValueError(f"SVF target regex {regex!r} matches no target matrix; candidates: {', '.join(candidates)} "
                     f"(presets: {', '.join(PRESETS)})")
  return chosen


def as_matrix(name: str, w):
  """Stacked parameter [L, ...] -> its matrix view [L, rows, cols] in our [in, out] layout."""
  leaf = name.split("/")[-1]
  if leaf in ("q", "k", "v"):
    return w.reshape(w.shape[0], w.shape[1], -1)
  if leaf == "o":
    return w.reshape(w.shape[0], -1, w.shape[-1])
  if leaf in ("gate", "up", "down"):
    return w
  raise ValueError(f"{name} is not an SVF target matrix (candidates: {', '.join(CANDIDATES)})")


ALGORITHMS = ("lapack", "gram")
GRAM_REFINE = 64  # "gram": the smallest singular directions re-solved by an exact SVD of W·V


@functools.partial(jax.jit, static_argnames=("algorithm", "refine"))
def svd_stack(w, algorithm: str = "lapack", refine: int = GRAM_REFINE):
  """Thin SVD of every matrix of w [N, rows, cols] (rows >= cols for "gram") in fp32:
  (U [N, rows, k], σ [N, k] descending, V [N, cols, k]). `refine`: "gram"'s exactly re-solved
  smallest directions."""
  w = w.astype(jnp.float32)
  if algorithm == "gram":
    hi = jax.lax.Precision.HIGHEST
    g = jnp.einsum("nrc,nrd->ncd", w, w, precision=hi)
    _, v = jnp.linalg.eigh(g)                        # ascending: the smallest σ first
    b = jnp.einsum("nrc,nck->nrk", w, v, precision=hi)  # W·V = U·diag(σ)
    r = min(refine, v.shape[-1])
    # The Gram's eigenvectors of tiny eigenvalues mix (error ε·σ_max²/gap): the r smallest
    # directions are re-solved by an exact SVD of W·V_r (rows × r), which only needs their span.
    p, s_lo, qh = jax.vmap(lambda x: jnp.linalg.svd(x, full_matrices=False))(b[:, :, :r])
    v_lo = jnp.einsum("nck,njk->ncj", v[:, :, :r], qh, precision=hi)
    # σ_i = ‖W·v_i‖ for the rest, not √λ_i: second-order in an error of v_i
    s_hi = jnp.sqrt(jnp.sum(b[:, :, r:] ** 2, axis=1))
    u_hi = b[:, :, r:] / jnp.where(s_hi > 0, s_hi, 1.0)[:, None, :]  # σ = 0: that column of W·V is 0
    s, u, v = (jnp.concatenate(x, axis=-1) for x in ((s_hi, s_lo), (u_hi, p), (v[:, :, r:], v_lo)))
    order = jnp.argsort(-s, axis=-1)                 # descending
    return (jnp.take_along_axis(u, order[:, None, :], axis=-1), jnp.take_along_axis(s, order, axis=-1),
            jnp.take_along_axis(v, order[:, None, :], axis=-1))
  if algorithm != "lapack":
    raise ValueError(f"SVD algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  u, s, vh = jax.vmap(lambda x: jnp.linalg.svd(x, full_matrices=False))(w)
  return u, s, jnp.swapaxes(vh, -1, -2)


def _place(x, mesh):
  """Splits the leading (stacked matrices) axis over all devices of `mesh` when it divides evenly."""
  if mesh is None:
    return x
  flat = jax.sharding.Mesh(np.asarray(mesh.devices).reshape(-1), ("x",))
  spec = jax.P("x") if x.shape[0] % flat.size == 0 else jax.P()
  return jax.device_put(x, jax.sharding.NamedSharding(flat, spec))


def decompose(params, targets: str = "mlp", mesh=None, algorithm: str = "lapack") -> dict[str, Factors]:
  """SVD factors of every target matrix of `params` (the decoder's nested dict), fp32.

  Matrices of equal shape (up to a transpose) are stacked and decomposed in one call.
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"SVD algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  layers = params["layers"]
  names = select_targets([f"layers/{k}" for k in layers], targets)
  groups: dict[tuple[int, int], list[tuple[str, bool, jax.Array]]] = {}
  for name in names:
    w = as_matrix(name, layers[name.split("/")[1]])
    flip = w.shape[1] < w.shape[2]  # canonical orientation rows >= cols (down [F,E] joins gate/up's [E,F]^T)
    m = jnp.swapaxes(w, 1, 2) if flip else w
    groups.setdefault(tuple(m.shape[1:]), []).append((name, flip, m))
  out = {}
  for members in groups.values():
    stacked = jnp.concatenate([m.astype(jnp.float32) for _, _, m in members], axis=0)
    u, s, v = svd_stack(_place(stacked, mesh), algorithm=algorithm)
    start = 0
    for name, flip, m in members:
      n = m.shape[0]
      uu, ss, vv = u[start:start + n], s[start:start + n], v[start:start + n]
      out[name] = Factors(vv, ss, uu) if flip else Factors(uu, ss, vv)
      start += n
  return out


def reconstruct(f: Factors):
  """U·diag(σ)·Vᵀ per layer: [L, rows, cols]."""
  return jnp.einsum("lrk,lk,lck->lrc", f.u, f.s, f.v)


def cache_path(cache_dir, base_fingerprint: str, targets: str, algorithm: str = "lapack") -> Path:
  key = target_regex(targets) if algorithm == "lapack" else f"{target_regex(targets)}\0{algorithm}"
  tag = hashlib.sha256(key.encode()).hexdigest()[:8]
  return Path(cache_dir) / f"svd-{base_fingerprint}-{tag}.safetensors"


def cached_decompose(params, targets: str = "mlp", cache_dir=None, mesh=None,
                     algorithm: str = "lapack") -> dict[str, Factors]:
  """`decompose` with an on-disk cache keyed by the parameters' fingerprint, target regex and algorithm."""
  if not cache_dir:
    return decompose(params, targets, mesh, algorithm)
  from safetensors import safe_open
  from safetensors.numpy import save_file
  fp = fingerprint(params)
  path = cache_path(cache_dir, fp, targets, algorithm)
  if path.exists():
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      if meta.get("fingerprint") != fp or meta.get("targets") != target_regex(targets):
        raise ValueError(f"SVD cache {path} belongs to another base or target set ({meta}); delete it")
      names = sorted({k.rsplit("/", 1)[0] for k in f.keys()})
      return {n: Factors(*(jnp.asarray(f.get_tensor(f"{n}/{p}")) for p in "usv")) for n in names}
  factors = decompose(params, targets, mesh, algorithm)
  tensors = {f"{n}/{p}": np.ascontiguousarray(np.asarray(getattr(fac, p), np.float32))
             for n, fac in factors.items() for p in "usv"}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  save_file(tensors, str(tmp), metadata={"fingerprint": fp, "targets": target_regex(targets), "format": "svf-svd"})
  os.replace(tmp, path)
  return factors
