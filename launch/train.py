"""python -m launch.train --config=configs/<...>.py[:arg] --workdir=DIR [--config.x=v ...]"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (resumed if it holds a checkpoint)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  from calm_jax.distributed import maybe_initialize_distributed
  from calm_jax.registry import get_method
  from launch.methods import import_methods
  maybe_initialize_distributed()
  import_methods()
  get_method(_CONFIG.value.method)(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  from calm_jax.malloc import reexec_tuned
  reexec_tuned("launch.train")  # a tuned glibc allocator (calm_jax/malloc.py): faster XLA steps on the CPU
  app.run(main)
