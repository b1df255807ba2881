"""TIES (arXiv 2306.01708): trim to density, elect signs, disjoint mean, × λ.

  configs/merge/ties.py            paper: global trim per model, unweighted vote, disjoint mean
  configs/merge/ties.py:mergekit   mergekit: per-tensor trim, weighted vote, ÷ Σ w·agree
"""
from configs.common import parse_arg
from configs.merge.common import merge_config


def get_config(arg=None):
  a = parse_arg(arg, convention="paper")
  return merge_config("ties", convention=a.convention)
