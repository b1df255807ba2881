"""Shared MoA defaults: the domains of the suite (with their harder task variants) and the LoRA block."""
import ml_collections

from configs.common import add_common

# Domains where the tiny base is weak: `count` is held out of its training mixture; addition,
# subtraction and sort are the longer variants of what it saw (3-digit operands where it was
# trained on 2, strings up to 10 letters where it saw 7).
DOMAINS = ("addition", "count", "sort", "subtraction")
TASK_ARGS = {"addition": {"max_digits": 3}, "subtraction": {"max_digits": 3}, "sort": {"max_len": 10},
             "reverse": {"max_len": 10}, "count": {}}


def lora_block(rank: int = 8, alpha: float = 16.0, targets: str = "layers/(q|k|v|o|gate|up|down)",
               dropout: float = 0.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(targets=targets, rank=rank, alpha=alpha, dropout=dropout))


def lora_training(steps: int, batch_size: int = 32, lr: float = 3e-3) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  add_common(t, steps=steps, batch_size=batch_size)
  t.optimizer.lr = lr
  t.optimizer.warmup_steps = 10
  t.optimizer.final_lr_fraction = 0.1
  t.tensorboard = False
  t.log_every = 50
  t.checkpoint.every = 1000
  return t
