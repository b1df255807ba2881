"""The merging experiment: per-task full fine-tunes of the tiny base, merged with every method.

  python -m launch.train --config=configs/merge/suite.py --workdir=DIR [--config.base_workdir=BASE]
  python -m launch.train --config=configs/merge/suite.py:tiny --workdir=DIR --config.base_workdir=BASE

The base is BASE/hf (`make demo`'s runs/demo/base); with no finished base there it is trained
into base_workdir, or DIR/base when base_workdir is "". `:tiny` (tests): 2 tasks, a few steps,
3 merges, 8 examples per task.
"""
import ml_collections

from configs.common import add_common, parse_arg
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
  c.tasks = list(TASKS)
  c.data = ml_collections.ConfigDict(dict(task_args=c.pretrain.data.task_args.to_dict()))
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
      lambdas=[round(0.1 * i, 1) for i in range(1, 11)],  # task arithmetic λ grid
      density=0.2,       # TIES (and MetaGPT+TIES) keep fraction
      drop_rate=0.5,     # DARE (and MetaGPT+DARE) drop probability
      dare_lam=0.3,      # DARE is task arithmetic on the dropped-and-rescaled vectors: its λ
      methods=[],        # [] every method; else method names or row names to run
      mesh="",           # "" one device; "all" shards every tensor over all devices
      keep=True))        # keep DIR/merged/* (HF directories)
  c.eval = ml_collections.ConfigDict(dict(n_per_task=100, batch_size=256, split="test"))
  if a.tiny:
    c.tasks = ["addition", "max"]
    c.finetune.steps = 4
    c.finetune.batch_size = 8
    c.finetune.log_every = 2
    c.merge.lambdas = [0.2, 0.6]
    c.merge.methods = ["task_arithmetic", "metagpt", "metagpt+ties"]
    c.merge.keep = False
    c.eval.update(n_per_task=8, batch_size=64)
  return c
