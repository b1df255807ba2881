"""Shared shape of every merge config: inputs, output, and the merge options of `merging.merge`.

  python -m launch.merge --config=configs/merge/<method>.py[:variant] --config.base=DIR \
      --config.models=DIR1,DIR2,DIR3 --config.out=DIR [--config.density=0.5 ...]

List-valued options are comma-separated strings (models, weights); an empty string means
"the method's default" (trim, vote, normalize, rescale: the convention's choice).
"""
import ml_collections

OPTIONS = dict(
    weights="",          # per-model w_i, e.g. "0.3,0.7" (not for metagpt: λ_t is computed)
    lam=1.0,             # λ: final scale of the merged task vector
    density=0.2,         # TIES: fraction of entries kept per model
    drop_rate=0.5,       # DARE: drop probability p
    sparsify="",         # metagpt only: "", "ties" or "dare"
    convention="paper",  # "paper" | "mergekit" (merging/options.py has the table)
    trim="",             # TIES trim: "global" | "tensor"
    vote="",             # sign election on "unweighted" | "weighted" task vectors
    normalize="",        # "none" | "count" (disjoint mean) | "weight" (÷ Σ w agree)
    rescale="",          # "none" | "inverse" (DARE ÷ (1 − p)) | "l1"
    seed=0,              # DARE masks
    include="",          # regex over tensor names: only these are merged
    exclude="",          # regex over tensor names: these keep the base value
    vocab_policy="truncate",  # embed/lm_head rows differ from the base: "truncate" | "exclude"
    out_dtype="",        # "" keeps each tensor's storage dtype; float32 | bfloat16 | float16
)


def merge_config(method: str, **options) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = method
  c.base = ""
  c.models = ""
  c.out = ""
  c.overwrite = False
  c.max_shard_size = "2GB"
  c.progress = True
  c.mesh = ""            # "" one device; "all": every tensor split over all devices (and hosts)
  # True: glibc returns freed buffers at once (peak RSS ~11x the largest tensor, slowest); False: it keeps
  # them; unset: False under launch.merge's tuned allocator (~13-21x, fastest), else True (calm_jax/malloc.py)
  c.low_memory = ml_collections.config_dict.placeholder(bool)
  # entries per piece of a large tensor (unset: merging.stream.CHUNK, 4M); 0: whole tensors (merging/engine.py)
  c.chunk = ml_collections.config_dict.placeholder(int)
  for k, v in {**OPTIONS, **options}.items():
    c[k] = v
  return c
