"""MoA on SmolLM2-135M-Instruct: four natural-language domains it cannot do (docs/reproductions.md).

  python -m launch.make_data --out=data/instruct --n_train=2000 --n_val=100 --n_test=200
  python -m launch.train --config=configs/moa/smollm2.py --workdir=runs/moa/smollm2

The suite's steps (moa/user_data.py) on one file per domain: a LoRA per domain, one LoRA on the mixed data
(as many steps as all experts together), routers on the union with the domains as labels, the separate
classifier; every mode scored (exact match) on each domain's 100 val records, routed with no labels.
`:data=DIR` reads the files elsewhere; `:tiny` is the pipeline in minutes.
"""
from configs.common import parse_arg
from configs.moa.suite import get_config as suite_config

TASKS = ("addition", "reverse", "uppercase", "count")


def get_config(arg=None):
  a = parse_arg(arg, data="data/instruct", tiny=False)
  c = suite_config()
  c.base = "smollm2-135m-instruct"
  c.data.domains = {t: f"{a.data}/{t}_train.jsonl" for t in TASKS}
  c.data.val_domains = {t: f"{a.data}/{t}_val.jsonl" for t in TASKS}
  c.data.max_len = 128
  c.lora.rank = 8
  # sized for the 2-core CPU (~35 min): 60 steps of 8 per expert, 240 for the single LoRA
  for t, steps in ((c.expert_train, 60), (c.moa, 40), (c.classifier, 40)):
    t.steps, t.batch_size, t.optimizer.lr, t.log_every = steps, 8, 3e-3, 10
    t.optimizer.warmup_steps = 5
  c.eval.update(metric="exact", max_new_tokens=24, batch_size=50)
  if a.tiny:
    c.lora.rank = 2
    for t in (c.expert_train, c.moa, c.classifier):
      t.steps, t.batch_size = 2, 4
  return c
