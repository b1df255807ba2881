"""Two-pass self-adaptation with SVF experts on held-out tasks (Transformer² §3.2).

  python -m launch.eval --config=configs/svf/adapt.py:strategy=prompt --workdir=DIR \
      --config.experts_dir=runs/demo/svf/experts
  strategies: prompt | classifier | cem | cem_layer

Experts are EXPERTS_DIR/TASK/expert.safetensors for TASK in `expert_tasks`; the classification
expert is EXPERTS_DIR/classifier/expert.safetensors (both written by configs/svf/suite.py).
"""
import ml_collections

from configs.common import parse_arg
from configs.svf.common import add_svf

EXPERT_TASKS = ("addition", "subtraction", "max")          # the base's three weakest tasks
# Held-out: two harder variants of expert tasks (3-digit sums; max over 6-8 numbers where the base saw 3-5),
# an unseen task made of the experts' skills (add / sub / max prompts interleaved, each keeping its own
# split), and a task with no expert (the right first pass keeps the base).
HELDOUT = ("addition_3d", "max_long", "mixed", "sort")
VARIANTS = {"addition_3d": {"task": "addition", "max_digits": 3},
            "max_long": {"task": "max", "min_count": 6, "max_count": 8},
            "mixed": {"task": "interleaved", "of": list(EXPERT_TASKS)}}
LABELS = {"add": "addition", "sub": "subtraction", "max": "max"}  # first-pass answer -> expert
OTHER_TASKS = ("reverse", "sort", "copy", "uppercase", "kv_lookup")  # the classifier's "other" examples


def add_adapt(c, a):
  c.expert_tasks = list(EXPERT_TASKS)
  c.experts_dir = "runs/demo/svf/experts"
  c.experts = {}             # {name: expert file}; {} -> EXPERTS_DIR/TASK/expert.safetensors per expert task
  c.classifier_expert = ""   # "" -> EXPERTS_DIR/classifier/expert.safetensors
  c.tasks = list(HELDOUT)
  c.data.variants = {k: dict(v) for k, v in VARIANTS.items()}
  # First pass of the prompt strategy. The tiny base follows no instructions and cannot echo a whole
  # prompt; it does copy 3+ letters, so it is shown `copy:` + the prompt's first 3 characters ({head})
  # and its echo's leading tag is the label. An instruction-following checkpoint takes a real
  # classification prompt with {prompt}. The classification expert sees the whole prompt.
  c.dispatch = ml_collections.ConfigDict(dict(template="copy:{head}=", head_chars=3, labels=dict(LABELS)))
  # The paper's CEM: population 32, 6 elites, initial mean 1/K, spread 0.5, clamp [0, 1]; 10 few-shot prompts.
  c.cem = ml_collections.ConfigDict(dict(population=32, elites=6, init_std=0.5, iters=10, n_shots=10, seed=0))
  c.eval = ml_collections.ConfigDict(dict(n_per_task=500, split="test", batch_size=256))
  if a.tiny:
    c.cem.iters = 2
    c.cem.n_shots = 4
    c.eval.update(n_per_task=8, batch_size=64)
  return c


def get_config(arg=None):
  a = parse_arg(arg, strategy="prompt", tiny=False)
  c = ml_collections.ConfigDict()
  c.method = "svf_adapt"
  add_svf(c, steps=0, batch_size=1)
  c.strategy = a.strategy
  add_adapt(c, a)
  return c
