"""The MoA experiment: per-domain LoRA experts + routers trained with domain labels, vs baselines.

  python -m launch.train --config=configs/moa/suite.py --workdir=DIR [--config.base_workdir=BASE]
  python -m launch.train --config=configs/moa/suite.py:tiny --workdir=DIR --config.base_workdir=BASE

The base is BASE/hf (`make demo`'s runs/demo/base), trained there if missing. Writes
DIR/results.json {"per_domain": {mode: {domain: acc}}, "router_accuracy": {layer: acc}, ...},
DIR/results.png and prints the tables. `:tiny` (tests): 2 domains, a few steps, 8 examples each.

On a model and files of one's own (moa/user_data.py), one file per domain, the routers trained on their union:

  python -m launch.train --config=configs/moa/suite.py --workdir=DIR --config.base=smollm2-135m-instruct \
      --config.data.domains='{"math": "math.jsonl", "code": "code.jsonl"}' --config.data.val_fraction=0.1
"""
import ml_collections

from configs.common import data_files, parse_arg
from configs.moa.common import DOMAINS, TASK_ARGS, lora_block, lora_training
from configs.pretrain import get_config as pretrain_config


def get_config(arg=None):
  a = parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.method = "moa_suite"
  c.seed = 0
  c.base_workdir = "runs/demo/base"   # the base is BASE/hf, trained there with config.pretrain if missing
  c.pretrain = pretrain_config()
  c.domains = list(DOMAINS)            # expert i = domains[i]
  c.base = ""                          # a model (directory, fetched name, Hub id) to use with data.domains
  c.data = ml_collections.ConfigDict(dict(task_args={k: dict(v) for k, v in TASK_ARGS.items()}))
  c.data.update(data_files())
  # {name: file}: one file per domain, the names are the labels; val_domains: validation files per domain (else
  # data.val_fraction). On the command line as JSON objects: --config.data.domains='{"math": "math.jsonl", ...}'
  c.data.domains = ml_collections.ConfigDict({})
  c.data.val_domains = ml_collections.ConfigDict({})
  c.lora = lora_block()                # rank 8, alpha 16, all seven projections
  c.expert_train = lora_training(steps=300)  # per domain; the single LoRA gets len(domains) x as many
  c.moa = lora_training(steps=150, lr=3e-3)
  c.moa.gamma = 1.0                    # weight of the router cross-entropy
  c.moa.train_experts = False          # True: experts fine-tune jointly in stage 2
  c.classifier = lora_training(steps=150, lr=3e-3)
  c.scratch = True                     # ablation: experts from B = 0, trained jointly with the routers
  c.scratch_steps = 600
  c.new_domain = "reverse"             # "" skips the new-domain extension
  c.inference = ml_collections.ConfigDict(dict(top_k=2))  # > 1 also scores soft top-k routing
  c.eval = ml_collections.ConfigDict(dict(n_per_task=100, batch_size=256, split="test", router_min_accuracy=0.9,
                                          metric="exact", max_new_tokens=64))  # metric: on data.domains' records
  if a.tiny:
    c.domains = ["addition", "count"]
    c.lora.rank = 2
    for t in (c.expert_train, c.moa, c.classifier):
      t.steps, t.batch_size, t.log_every = 3, 8, 1
    c.scratch_steps = 3
    c.new_domain = "sort"
    c.eval.update(n_per_task=8, batch_size=64)
  return c
