"""Merging parameter pytrees in memory: `merge(base, finetuned, method, **options)`.

Leaves are named by their '/'-joined path (`layers/q`, `embed`), which is what the include /
exclude regexes and the report use. The fine-tuned trees must have the base's structure and
leaf shapes (up to the vocab policy on embedding-like leaves).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from merging.engine import Merger
from merging.options import MergeError, resolve_checked


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def named_leaves(tree) -> tuple[dict[str, Any], Any]:
  """({'/'-joined path: leaf}, treedef)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}, treedef


class PytreeSource:
  """`engine.Source` over in-memory pytrees (model -1 is the base)."""

  def __init__(self, base, finetuned: Sequence):
    self.base, self.treedef = named_leaves(base)
    self.models = [named_leaves(t)[0] for t in finetuned]
    self.num_models = len(self.models)

  def _tree(self, i):
    return self.base if i < 0 else self.models[i]

  def names(self, i):
    return self._tree(i)

  def shape(self, i, name):
    return tuple(np.shape(self._tree(i)[name]))

  def dtype(self, i, name):
    return np.dtype(self._tree(i)[name].dtype)

  def get(self, i, name):
    return self._tree(i)[name]

  def origin(self, i):
    return "the base" if i < 0 else f"finetuned[{i}]"

  def where(self, i, name):
    return f"leaf {name} of {self.origin(i)}"

  def release(self, name):
    """Nothing to free: the trees stay the caller's."""


def merge(base, finetuned: Sequence, method: str = "metagpt", *, mesh=None, **options) -> tuple[Any, dict]:
  """Merges fine-tuned pytrees into `base`: returns (merged pytree, report dict).

  Methods: average, task_arithmetic, ties, dare, dare_ties, metagpt (see `merging.options`
  for every option and the paper / mergekit conventions). Example:
  `merge(base, [ft1, ft2, ft3], "metagpt", sparsify="ties", density=0.5)`. `mesh` ("all" or a
  `jax.sharding.Mesh`; default one device) shards each tensor over the devices (`engine.merge_mesh`).
  """
  if isinstance(finetuned, dict) or not isinstance(finetuned, (list, tuple)):
    raise MergeError("finetuned must be a list of pytrees with the base's structure")
  source = PytreeSource(base, finetuned)
  merger = Merger(source, resolve_checked(method, source.num_models, options), mesh=mesh)
  merged = dict(merger)
  leaves = [merged[name] for name in source.names(-1)]
  return jax.tree_util.tree_unflatten(source.treedef, leaves), merger.report.to_dict()


def task_vectors(base, finetuned: Sequence) -> list:
  """τ_i = θ_i − θ_0 leaf by leaf, in fp32."""
  return [jax.tree.map(lambda t, b: jnp.asarray(t, jnp.float32) - jnp.asarray(b, jnp.float32), ft, base)
          for ft in finetuned]
