"""Merge HF checkpoints (streaming, tensor by tensor):

  python -m launch.merge --config=configs/merge/<method>.py[:variant] --config.base=DIR \
      --config.models=DIR1,DIR2 --config.out=DIR [--config.overwrite] [--config.<option>=...]
  python -m launch.merge --mergekit_yaml=FILE.yml --out=DIR [--overwrite] [--seed=N]

It re-executes itself once under a tuned glibc allocator (calm_jax/malloc.py: ~1.6x faster) and
keeps compiled kernels in a persistent cache (calm_jax/compile_cache.py: later runs skip compiling).
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "merge config (configs/merge/*.py)", lock_config=True)
_YAML = flags.DEFINE_string("mergekit_yaml", None, "a mergekit YAML config to run instead of --config")
_OUT = flags.DEFINE_string("out", None, "output directory (with --mergekit_yaml)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --out if it exists (with --mergekit_yaml)")
_SEED = flags.DEFINE_integer("seed", 0, "DARE seed (with --mergekit_yaml)")
_CACHE = flags.DEFINE_string("compile_cache", None, "persistent XLA compile cache directory ('' off; default: "
                             "$CALM_JAX_COMPILE_CACHE, else ~/.cache/calm_jax/xla; calm_jax/compile_cache.py)")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from calm_jax import compile_cache
  compile_cache.enable(_CACHE.value)  # a second merge of the same shapes loads its kernels
  if _YAML.value:
    if _CONFIG.value is not None or not _OUT.value:
      raise app.UsageError("--mergekit_yaml takes --out (and no --config)")
    from merging.mergekit_yaml import run_mergekit_yaml
    out = run_mergekit_yaml(_YAML.value, _OUT.value, overwrite=_OVERWRITE.value, seed=_SEED.value)
  elif _CONFIG.value is not None:
    from merging.cli import run_config
    out = run_config(_CONFIG.value)
  else:
    raise app.UsageError("give --config=configs/merge/<method>.py or --mergekit_yaml=FILE.yml --out=DIR")
  print(f"merged model written to {out}")


if __name__ == "__main__":
  from launch.common import run
  # under the tuned glibc allocator: buffers reused across tensors
  run(main, "launch.merge", reexec_module="launch.merge",
      where=lambda: _OUT.value or (_CONFIG.value.out if _CONFIG.value is not None else None))
