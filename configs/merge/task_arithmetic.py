"""Task arithmetic (arXiv 2212.04089): θ = θ_0 + λ Σ w_i τ_i. Set --config.lam and --config.weights."""
from configs.merge.common import merge_config


def get_config(arg=None):
  del arg
  return merge_config("task_arithmetic")
