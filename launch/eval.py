"""Evaluate an HF checkpoint on the synthetic suite, or run an evaluation config.

  python -m launch.eval --model=runs/demo/base/hf --tasks=addition,reverse --n_per_task=200
  python -m launch.eval --model=DIR --tasks=addition --task_args='{"addition": {"max_digits": 3}}'
  python -m launch.eval --config=configs/<...>.py:arg --workdir=DIR

A checkpoint trained on the suite is scored on the task settings it recorded (its
task_settings.json); --task_args overrides them task by task.
"""
import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "evaluation config (dispatches on config.method)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory for results.json")
_MODEL = flags.DEFINE_string("model", None, "HF model directory to evaluate on the task suite")
_TASKS = flags.DEFINE_list("tasks", None, "tasks to evaluate (default: the whole suite)")
_TASK_ARGS = flags.DEFINE_string("task_args", None, "JSON {task: {argument: value}} overriding the model's "
                                 "recorded task settings")
_N = flags.DEFINE_integer("n_per_task", 200, "examples per task")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "split to evaluate on")


def main(argv):
  del argv
  if _CONFIG.value is not None:
    from calm_jax.registry import get_method
    from launch.methods import import_methods
    import_methods()
    get_method(_CONFIG.value.method)(_CONFIG.value, _WORKDIR.value)
    return
  if not _MODEL.value:
    raise app.UsageError("give --model=HF_DIR or --config=FILE")
  try:
    task_args = json.loads(_TASK_ARGS.value) if _TASK_ARGS.value else None
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--task_args is not JSON: {e}") from None
  from calm_jax.evaluate import evaluate_checkpoint
  evaluate_checkpoint(_MODEL.value, tasks=_TASKS.value, n_per_task=_N.value, split=_SPLIT.value,
                      workdir=_WORKDIR.value, task_args=task_args)


if __name__ == "__main__":
  from launch.common import run
  run(main, "launch.eval")
