"""Task vectors and merge methods (average, task arithmetic, TIES, DARE, DARE-TIES, MetaGPT).

`merge(base, finetuned, method, **options)` merges pytrees in memory; `merge_checkpoints(base_dir,
model_dirs, out_dir, method, **options)` streams HF safetensors checkpoints tensor by tensor.
Both run the same per-tensor kernels (`merging.kernels`); `merging.options` documents the
methods and the paper vs mergekit conventions.
"""
from merging.options import METHODS, MergeError, MergeOptions, resolve
from merging.pytree import merge, task_vectors
from merging.stream import merge_checkpoints

__all__ = ["METHODS", "MergeError", "MergeOptions", "merge", "merge_checkpoints", "resolve", "task_vectors"]
