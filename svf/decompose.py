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
WᵀW (cols × cols) gives V and σ² in one symmetric eigensolve, U = W·V/σ. About 3-4× faster on
CPU; the price is the Gram's squared condition number: σ_i loses relative accuracy as
(σ_max/σ_i)²·ε and the U columns of tiny σ_i are not orthonormal. U·diag(σ)·Vᵀ = W·V·Vᵀ still
reconstructs W to ~1e-6 relative, and an SVF update U·diag(σ⊙m)·Vᵀ = W·V·diag(m)·Vᵀ never
divides by σ — so for SVF it is a sound speed/accuracy trade; measured in benchmarks/svd.py.

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


@functools.partial(jax.jit, static_argnames="algorithm")
def svd_stack(w, algorithm: str = "lapack"):
  """Thin SVD of every matrix of w [N, rows, cols] (rows >= cols for "gram") in fp32:
  (U [N, rows, k], σ [N, k] descending, V [N, cols, k])."""
  w = w.astype(jnp.float32)
  if algorithm == "gram":
    g = jnp.einsum("nrc,nrd->ncd", w, w, precision=jax.lax.Precision.HIGHEST)
    lam, v = jnp.linalg.eigh(g)                      # ascending
    lam, v = lam[:, ::-1], v[:, :, ::-1]
    s = jnp.sqrt(jnp.maximum(lam, 0.0))
    u = jnp.einsum("nrc,nck->nrk", w, v, precision=jax.lax.Precision.HIGHEST)
    u = u / jnp.where(s > 0, s, 1.0)[:, None, :]     # σ = 0: that column of W·V is 0 already
    return u, s, v
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
