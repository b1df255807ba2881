"""CALM on models and dataset files of one's own, across tokenizers (method "calm_compose", calm/compose_files.py).

  python -m launch.train --config=configs/calm/compose.py --workdir=W \\
      --config.anchor=smollm2-135m-instruct --config.augmenting=runs/demo/base/hf \\
      --config.data.train=train.jsonl --config.data.val=val.jsonl --config.eval.metric=exact
  python -m launch.train --config=configs/calm/compose.py:tiny ...   # a few steps, a few tokens

Models are directories, `launch.fetch` names or Hub ids (`calm_jax.hub.model_dir`); "embedded" is the
character-level base of `base_workdir` (trained there first if missing). An augmenting model whose
tokenizer differs from the anchor's reads its own tokenization of the same text (docs/calm.md, "Across
tokenizers"). Writes W/compose (compose.safetensors + compose.json) and W/results.json (the anchor alone
and the composition on the val records).
"""
import ml_collections

from configs.common import add_common, data_files, parse_arg
from configs.pretrain import get_config as pretrain_config


def get_config(arg=None):
  a = parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.method = "calm_compose"
  c.seed = 0
  c.anchor = "smollm2-135m-instruct"
  c.augmenting = ("embedded",)  # a tuple: --config.augmenting=A [--config.augmenting=B ...]
  c.base_workdir = "runs/demo/base"  # what "embedded" names: BASE/hf, trained with config.pretrain if missing
  c.pretrain = pretrain_config()
  c.data = ml_collections.ConfigDict(data_files())
  # Connections (1-based layer outputs, the same lists for every augmenting model); () = every 4th layer of
  # each augmenting model -> evenly spaced anchor layers from 1. num_heads 0 = the anchor's. cross_null: a learned
  # key with a zero value (compose.py). cross_rope is not offered: two tokenizers share no token positions.
  c.compose = ml_collections.ConfigDict(dict(augment_layers=(), anchor_layers=(), num_heads=0, cross_null=False))
  c.train = ml_collections.ConfigDict()
  add_common(c.train, steps=500, batch_size=8)
  c.train.optimizer.lr = 3e-4
  c.train.optimizer.warmup_steps = 20
  c.train.optimizer.weight_decay = 0.01
  c.train.tensorboard = False
  c.train.log_every = 20
  c.train.checkpoint.every = 250
  c.eval = ml_collections.ConfigDict(dict(metric="exact", max_new_tokens=32, batch_size=8))
  if a.tiny:
    c.train.steps = 4
    c.train.batch_size = 4
    c.train.log_every = 2
    c.train.checkpoint.every = 1000
    c.data.max_len = 96
    c.eval.update(max_new_tokens=6, batch_size=4)
  return c
