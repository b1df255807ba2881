"""MetaGPT (arXiv 2406.11385): θ = θ_0 + Σ λ_t τ_t, λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² over all merged parameters.

  configs/merge/metagpt.py         plain MetaGPT
  configs/merge/metagpt.py:ties    TIES-sparsified task vectors, then weighted by λ_t (--config.density)
  configs/merge/metagpt.py:dare    DARE-sparsified task vectors, then weighted by λ_t (--config.drop_rate)
"""
from configs.common import parse_arg
from configs.merge.common import merge_config


def get_config(arg=None):
  a = parse_arg(arg, sparsify="none", convention="paper")
  return merge_config("metagpt", sparsify="" if a.sparsify == "none" else a.sparsify, convention=a.convention)
