"""One MoA domain expert: a LoRA of the tiny base trained on one domain's data, or a LoRA of any model on
dataset files of one's own.

  python -m launch.train --config=configs/moa/expert.py:domain=count --workdir=DIR [--config.base_workdir=BASE]
  python -m launch.train --config=configs/moa/expert.py --workdir=DIR --config.base=smollm2-135m-instruct \\
      --config.data.train=train.jsonl --config.data.val=val.jsonl --config.eval.metric=exact

Writes DIR/adapter (adapter.safetensors + adapter_config.json with the base fingerprint) and
DIR/results.json ({"base_accuracy", "accuracy"} on the domain's test split). `:tiny`: a few steps.
"""
import ml_collections

from configs.common import data_files, parse_arg
from configs.moa.common import TASK_ARGS, lora_block, lora_training
from configs.pretrain import get_config as pretrain_config


def get_config(arg=None):
  a = parse_arg(arg, domain="count", tiny=False)
  c = ml_collections.ConfigDict()
  c.method = "moa_expert"
  c.seed = 0
  c.base_workdir = "runs/demo/base"   # the base is BASE/hf, trained there with config.pretrain if missing
  c.pretrain = pretrain_config()
  c.domain = a.domain
  c.base = ""                         # a model (directory, fetched name, Hub id) to train on data.train instead
  c.data = ml_collections.ConfigDict(dict(task_args={k: dict(v) for k, v in TASK_ARGS.items()}))
  c.data.update(data_files())
  c.lora = lora_block()
  c.train = lora_training(steps=300)
  c.eval = ml_collections.ConfigDict(dict(n_per_task=100, batch_size=256, split="test", metric="exact",
                                          max_new_tokens=64))
  if a.tiny:
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every = 2
    c.lora.rank = 2
    c.eval.update(n_per_task=8, batch_size=64)
  return c
