"""Weight averaging: θ = Σ w_i θ_i / Σ w_i (equal weights unless --config.weights)."""
from configs.merge.common import merge_config


def get_config(arg=None):
  del arg
  return merge_config("average")
