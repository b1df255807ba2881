"""Evaluate a model on your dataset file or on the synthetic suite, or run an evaluation config.

  python -m launch.eval --model=smollm2-135m-instruct --data=qa.jsonl --metric=exact --out=runs/eval/qa
  python -m launch.eval --model=DIR --data=gsm8k_test.jsonl --metric=number --out=OUT --max_new_tokens=384
  python -m launch.eval --model=DIR --data=mc.jsonl --metric=choice --out=OUT     # records with "choices"
  python -m launch.eval --model=DIR --data=chat.jsonl --metric=ppl --out=OUT
  python -m launch.eval --model=runs/demo/base/hf --tasks=addition,reverse --n_per_task=200
  python -m launch.eval --model=DIR --tasks=addition --task_args='{"addition": {"max_digits": 3}}'
  python -m launch.eval --config=configs/<...>.py:arg --workdir=DIR

--model: an HF directory, a fetched model's name or a Hub id. --metric: exact | number | choice | ppl
(calm_jax/data/metrics.py); writes OUT/results.json and OUT/predictions.jsonl.

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
_DATA = flags.DEFINE_string("data", None, "dataset file (.jsonl/.json/.csv/.parquet) or Hub dataset to score on")
_METRIC = flags.DEFINE_enum("metric", None, ["exact", "number", "choice", "ppl"], "metric for --data")
_OUT = flags.DEFINE_string("out", None, "output directory for --data: results.json, predictions.jsonl")
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "prompt_answer", "chat"], "record schema of --data")
_FIELDS = flags.DEFINE_string("fields", None, 'JSON {our field: the file\'s}, e.g. {"prompt": "question"}')
_TEMPLATE = flags.DEFINE_enum("chat_template", "auto", ["auto", "true", "false"], "use the tokenizer's chat template")
_MAX_LEN = flags.DEFINE_integer("max_len", 2048, "longest row in tokens (prompts are cut on the left)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "longest generated answer (exact, number)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "records per batch")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "compute dtype of the weights")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing --out")


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
  if _DATA.value:
    if not (_METRIC.value and _OUT.value):
      raise app.UsageError("--data needs --metric and --out")
    try:
      fields = json.loads(_FIELDS.value) if _FIELDS.value else None
    except json.JSONDecodeError as e:
      raise app.UsageError(f"--fields is not JSON: {e}") from None
    from calm_jax.evaluate import evaluate_dataset
    evaluate_dataset(_MODEL.value, _DATA.value, _METRIC.value, _OUT.value, fmt=_FORMAT.value, fields=fields,
                     chat_template=_TEMPLATE.value, max_len=_MAX_LEN.value, max_new_tokens=_MAX_NEW.value,
                     batch_size=_BATCH.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
    return
  try:
    task_args = json.loads(_TASK_ARGS.value) if _TASK_ARGS.value else None
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--task_args is not JSON: {e}") from None
  from calm_jax.evaluate import evaluate_checkpoint
  evaluate_checkpoint(_MODEL.value, tasks=_TASKS.value, n_per_task=_N.value, split=_SPLIT.value,
                      workdir=_WORKDIR.value, task_args=task_args)


if __name__ == "__main__":
  from launch.common import run
  run(main, "launch.eval", where=lambda: _OUT.value or _WORKDIR.value)
