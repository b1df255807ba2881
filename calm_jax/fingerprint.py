"""Content fingerprints of parameter trees, so an adapter, an expert or a cache knows its base.

`fingerprint` hashes the bytes of every leaf (blake2b), with its path and shape, after rounding it
to bfloat16: two bases that differ anywhere above bf16's precision (one weight changed, two rows
swapped) get different fingerprints, while the same checkpoint loaded in fp32, bf16 or fp16 gets
the same one (its values round to the same bf16 numbers). Sharded leaves are gathered piece by
piece onto the host, so it is stable across meshes.
"""
from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


@jax.jit
def _canonical(x):
  return x.astype(jnp.float32).astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def fingerprint(tree) -> str:
  """blake2b over (path, shape, bf16-rounded bytes) of every leaf, in path order (16 hex chars)."""
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = jnp.asarray(leaf)
    h.update(json.dumps([jax.tree_util.keystr(path), list(arr.shape)]).encode())
    if arr.size:
      h.update(np.ascontiguousarray(_host(_canonical(arr))).tobytes())
  return h.hexdigest()[:16]


def structure_fingerprint(tree) -> str:
  """sha256 over leaf paths, shapes and dtypes only."""
  items = sorted((jax.tree_util.keystr(p), list(np.shape(l)), str(jnp.asarray(l).dtype if not hasattr(l, "dtype") else l.dtype))
                 for p, l in jax.tree_util.tree_flatten_with_path(tree)[0])
  return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
