"""python -m launch.train --config=configs/<...>.py[:arg] --workdir=DIR [--config.x=v ...]

The workdir is locked for the run and must be new, empty, or one of our runs (a model directory or
anything else is refused, never overwritten); a run of the same config there resumes.
"""
from absl import flags, logging
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
  get_method(_CONFIG.value.method)(_CONFIG.value, _WORKDIR.value)  # checks, locks and marks the workdir


if __name__ == "__main__":
  from launch.common import run
  # under the tuned glibc allocator: faster XLA steps on the CPU
  run(main, "launch.train", reexec_module="launch.train", where=lambda: _WORKDIR.value)
