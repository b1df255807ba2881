"""Train one SVF expert (Transformer² z vectors) on one task of the suite.

  python -m launch.train --config=configs/svf/expert.py:task=addition --workdir=DIR
  python -m launch.train --config=configs/svf/expert.py:task=addition,objective=ntp --workdir=DIR
  python -m launch.train --config=configs/svf/expert.py:task=addition,tiny --workdir=DIR   # seconds

Writes DIR/expert.safetensors (best validation accuracy) and DIR/results.json.

On a model and dataset files of one's own (svf/on_files.py): the metric is the validation score and,
for REINFORCE, the reward (+1 when the sampled answer scores, -1 when not):

  python -m launch.train --config=configs/svf/expert.py --config.base=smollm2-135m-instruct \
      --config.data.train=train.jsonl --config.data.val=val.jsonl --config.eval.metric=exact --workdir=DIR
"""
import ml_collections

from configs.common import parse_arg
from configs.svf.common import add_svf


def get_config(arg=None):
  a = parse_arg(arg, task="addition", objective="reinforce", adapter="svf", tiny=False)
  c = ml_collections.ConfigDict()
  c.method = "svf_expert"
  add_svf(c, steps=100, batch_size=32)
  c.task = a.task
  c.objective = a.objective  # "reinforce" | "ntp"
  c.adapter = a.adapter      # "svf" | "lora" (the baseline: calm_jax.lora on the same matrices)
  c.lora = ml_collections.ConfigDict(dict(rank="auto", alpha=0.0))  # auto: params >= SVF's; alpha 0 -> = rank
  # temperature 0 = greedy rollouts as in the official code; kl_coef λ (official runs: 0.1 / 0.3);
  # baseline: subtract the batch's mean reward; max_new_tokens 0 = the task's longest answer + eos.
  c.rl = ml_collections.ConfigDict(dict(temperature=1.0, kl_coef=0.0, baseline=False, max_new_tokens=0))
  # metric / max_new_tokens: on dataset files (exact | number | choice; choice needs the ntp objective).
  c.eval = ml_collections.ConfigDict(dict(n_val=100, n_test=200, batch_size=256, split="test", metric="exact",
                                          max_new_tokens=64))
  c.eval_every = 10
  c.log_every = 10
  c.checkpoint.every = 50
  c.quiet = False
  # task=svf_classify trains the classification expert (config.classifier.sources: its labels)
  if a.task == "svf_classify":
    from configs.svf.adapt import LABELS, OTHER_TASKS
    c.classifier.sources = {**{label: [t] for label, t in LABELS.items()}, "other": list(OTHER_TASKS)}
    c.objective = a.objective if arg and "objective" in arg else "ntp"
  if a.tiny:
    c.steps = 4
    c.batch_size = 8
    c.eval.update(n_val=8, n_test=8, batch_size=64)
    c.eval_every = 2
    c.log_every = 2
    c.checkpoint.every = 2
  return c
