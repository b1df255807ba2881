"""DARE (arXiv 2311.03099): drop task-vector entries with probability p, rescale, then task arithmetic.

  configs/merge/dare.py            rescale 1/(1 − p) (paper)
  configs/merge/dare.py:mergekit   rescale to the tensor's L1 norm (mergekit ≥ 0.1)
  configs/merge/dare.py:ties       DARE-TIES (sign election after the drop); combine with mergekit:
                                   configs/merge/dare.py:ties,convention=mergekit
"""
from configs.common import parse_arg
from configs.merge.common import merge_config


def get_config(arg=None):
  a = parse_arg(arg, convention="paper", ties=False, mergekit=False)
  convention = "mergekit" if a.mergekit else a.convention
  return merge_config("dare_ties" if a.ties else "dare", convention=convention)
