"""Content fingerprints of parameter trees, so an adapter or checkpoint knows its base."""
from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _moments(x):
  x = x.astype(jnp.float32)
  return jnp.stack([jnp.sum(x), jnp.sum(x * x), x.reshape(-1)[0], x.reshape(-1)[-1]])


def fingerprint(tree) -> str:
  """sha256 over leaf paths, shapes, dtypes and fp32 moments of the values (16 hex chars).

  Stable across sharding and storage order; distinguishes different bases of one shape.
  """
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = jnp.asarray(leaf)
    stats = np.asarray(_moments(arr), np.float64) if arr.size else np.zeros(4)
    h.update(json.dumps([jax.tree_util.keystr(path), list(arr.shape), str(arr.dtype)]).encode())
    h.update(json.dumps([f"{v:.5g}" for v in stats]).encode())  # 5 significant digits: reduction-order safe
  return h.hexdigest()[:16]


def structure_fingerprint(tree) -> str:
  """sha256 over leaf paths, shapes and dtypes only."""
  items = sorted((jax.tree_util.keystr(p), list(np.shape(l)), str(jnp.asarray(l).dtype if not hasattr(l, "dtype") else l.dtype))
                 for p, l in jax.tree_util.tree_flatten_with_path(tree)[0])
  return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
