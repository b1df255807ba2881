"""The merging experiment: per-task full fine-tunes of the tiny base, merged with every method; or the
user's own fine-tunes of any base, scored on the user's eval files.

  python -m launch.train --config=configs/merge/suite.py --workdir=DIR [--config.base_workdir=BASE]
  python -m launch.train --config=configs/merge/suite.py:tiny --workdir=DIR --config.base_workdir=BASE
  python -m launch.train --config=configs/merge/suite.py --workdir=DIR --config.base=BASE \\
      --config.models='{"math": "ft_math", "code": "ft_code"}' \\
      --config.data.eval='{"math": "math_val.jsonl", "code": "code_val.jsonl"}' [--config.eval.metric=number]

The base is BASE/hf (`make demo`'s runs/demo/base); with no finished base there it is trained
into base_workdir, or DIR/base when base_workdir is "". `:tiny` (tests): 2 tasks, a few steps,
3 merges, 8 examples per task.

On one's own models (`config.models` set; `merging/suite_files.py`): `base` and every model are a
directory, a fetched name or a Hub id; `models` and `data.eval` (and `data.val`) are {task: ...}
mappings, given on the command line as JSON objects. Each eval file is split into validation
(`data.val_fraction` of it, seeded by `data.seed`; or the file `data.val[task]`) for choosing task
arithmetic's λ and test for the table.
"""
import ml_collections

from configs.common import add_common, data_files, parse_arg
from configs.pretrain import get_config as pretrain_config

# the four tasks the base is weakest on (runs/demo/base: 80, 71, 84, 96 % test accuracy)
TASKS = ("addition", "subtraction", "max", "sort")


def get_config(arg=None):
  a = parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.method = "merge_suite"
  c.seed = 0
  c.base_workdir = ""       # "" -> DIR/base; the base is trained there with config.pretrain if missing
  c.pretrain = pretrain_config()
  c.tasks = TASKS  # a tuple: --config.tasks='("addition", "max")'
  # One's own models: {task: fine-tuned model} merged onto `base` (a directory, fetched name or Hub id;
  # required with models) and scored on data.eval[task]; empty: the synthetic experiment above.
  c.base = ""
  c.models = ml_collections.ConfigDict({})
  files = data_files()
  files.update(val_fraction=0.5, max_len=1024)
  for key in ("train", "val", "test"):
    del files[key]
  c.data = ml_collections.ConfigDict(dict(task_args=c.pretrain.data.task_args.to_dict(), eval={}, val={}, **files))
  ft = ml_collections.ConfigDict()
  add_common(ft, steps=300, batch_size=32)
  ft.optimizer.lr = 2e-3
  ft.optimizer.warmup_steps = 10
  ft.optimizer.final_lr_fraction = 0.1
  ft.tensorboard = False
  ft.log_every = 50
  ft.checkpoint.every = 1000
  c.finetune = ft
  c.merge = ml_collections.ConfigDict(dict(
      # tuples, not lists, so that the command line can set them: --config.merge.lambdas='(0.3, 0.6)'
      lambdas=tuple(round(0.1 * i, 1) for i in range(1, 11)),  # task arithmetic λ grid
      density=0.2,       # TIES (and MetaGPT+TIES) keep fraction
      drop_rate=0.5,     # DARE (and MetaGPT+DARE) drop probability
      dare_lam=0.3,      # DARE is task arithmetic on the dropped-and-rescaled vectors: its λ
      methods=(),        # () every method; else method names or row names to run
      mesh="",           # "" one device; "all" shards every tensor over all devices
      # keep DIR/merged/* (HF directories); None: kept for the synthetic suite, not on one's own models
      # (each is a whole model; the table and predictions need none of them)
      keep=ml_collections.config_dict.placeholder(bool)))
  # metric and max_new_tokens: scoring the eval files (exact, number or choice; calm_jax.data.metrics)
  c.eval = ml_collections.ConfigDict(dict(n_per_task=100, batch_size=256, split="test", metric="exact",
                                          max_new_tokens=64))
  if a.tiny:
    c.tasks = ("addition", "max")
    c.finetune.steps = 4
    c.finetune.batch_size = 8
    c.finetune.log_every = 2
    c.merge.lambdas = (0.2, 0.6)
    c.merge.methods = ("task_arithmetic", "metagpt", "metagpt+ties")
    c.merge.keep = False
    c.eval.update(n_per_task=8, batch_size=64)
  return c
