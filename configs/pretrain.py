"""Pretrain the tiny llama-family base on a mixture of the synthetic suite.

  python -m launch.train --config=configs/pretrain.py --workdir=runs/base
  python -m launch.train --config=configs/pretrain.py:tiny --workdir=/tmp/x   # seconds, for tests

Writes DIR/results.json ({"accuracy": {task: acc}, "seconds": s}, test split) and the base as an
HF directory DIR/hf (weights, config.json, char tokenizer).
"""
import ml_collections

from configs.common import add_common, parse_arg

# `count` and `kv_arithmetic` stay out of the base's mixture: held-out tasks for the methods
# (Transformer² adapts to unseen tasks; CALM composes kv_lookup with arithmetic).
TASKS = ("addition", "subtraction", "kv_lookup", "reverse", "sort", "copy", "max", "uppercase")


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.method = "pretrain"
  add_common(c, steps=2000, batch_size=64)
  c.model = ml_collections.ConfigDict(dict(
      model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
      tie_word_embeddings=False, init_std=0.02, dtype="float32"))
  # seq_len 0: the longest example. task_args configure tasks, e.g. {"addition": {"max_digits": 2}}.
  c.data = ml_collections.ConfigDict(dict(tasks={t: 1.0 for t in TASKS}, seq_len=0,
                                          task_args={"addition": {"max_digits": 2}, "subtraction": {"max_digits": 2}}))
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.01
  c.optimizer.final_lr_fraction = 0.05
  c.eval = ml_collections.ConfigDict(dict(n_per_task=200, batch_size=256, split="test"))
  c.eval_every = 1000
  c.reuse = True  # a finished base in the workdir is reused instead of retrained
  if arg.tiny:
    c.steps = 30
    c.batch_size = 16
    c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
    c.eval.update(n_per_task=8, batch_size=64)
    c.eval_every = 0
    c.log_every = 10
    c.checkpoint.every = 10
    c.tensorboard = False
  return c
