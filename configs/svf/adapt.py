"""Two-pass self-adaptation with SVF experts on held-out tasks (Transformer² §3.2).

  python -m launch.eval --config=configs/svf/adapt.py:strategy=prompt --workdir=DIR \
      --config.experts_dir=runs/demo/svf/experts
  strategies: prompt | classifier | cem | cem_layer

Experts are EXPERTS_DIR/TASK/expert.safetensors for TASK in `expert_tasks`; the classification
expert is EXPERTS_DIR/classifier/expert.safetensors (both written by configs/svf/suite.py).

On a model and test records of one's own (svf/adapt_files.py; every strategy in `strategies`):

  python -m launch.eval --config=configs/svf/adapt.py --workdir=DIR --config.base=smollm2-135m-instruct \
      --config.experts='{"math": "M/expert.safetensors", "reverse": "R/expert.safetensors"}' \
      --config.data.test=test.jsonl
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
# The paper's first pass for an instruction model (svf.dispatch.score_categories): the model is asked which
# category the prompt belongs to, and each category name (the experts' labels + "other") is scored by its
# log-likelihood as the answer. {examples}: k labelled prompts per category through EXAMPLE_TEMPLATE.
DISPATCH_TEMPLATE = ("Which category does this question belong to? The categories are: {categories}.\n\n"
                     "{examples}Question: {prompt}\nAnswer: ")
EXAMPLE_TEMPLATE = "Question: {prompt}\nAnswer: {label}\n\n"


def _classifier_training():
  """The classification expert's training on files (svf/on_files.py): next-token prediction of the labels."""
  from configs.svf.expert import get_config as expert_config
  e = expert_config("objective=ntp")
  e.optimizer.lr = 3e-2  # the paper's 2e-3 moves sigmoid(z) < 0.1 % a step (docs/svf.md)
  e.steps, e.batch_size, e.eval_every, e.quiet = 200, 16, 50, True
  return e


def add_adapt(c, a):
  c.expert_tasks = list(EXPERT_TASKS)
  c.experts_dir = "runs/demo/svf/experts"
  c.experts = ml_collections.ConfigDict({})  # {name: expert file} (JSON); {} -> EXPERTS_DIR/TASK/expert.safetensors
  c.classifier_expert = ""   # "" -> EXPERTS_DIR/classifier/expert.safetensors
  c.tasks = list(HELDOUT)
  c.data.variants = {k: dict(v) for k, v in VARIANTS.items()}
  # First pass of the prompt strategy. The tiny base follows no instructions and cannot echo a whole
  # prompt; it does copy 3+ letters, so it is shown `copy:` + the prompt's first 3 characters ({head})
  # and its echo's leading tag is the label. An instruction-following checkpoint takes a real
  # classification prompt with {prompt}. The classification expert sees the whole prompt.
  c.dispatch = ml_collections.ConfigDict(dict(template="copy:{head}=", head_chars=3, labels=dict(LABELS)))
  # On dataset files (config.data.test): experts {label: expert file}, and `category_template`, the paper's
  # classification prompt, each category name scored by log-likelihood (svf.dispatch.score_categories).
  # shots: labelled examples per category from the experts' train files, unless `examples` ({label: [prompt]},
  # "other" included) gives them; per_token: rank by mean log-likelihood per token instead of the sum;
  # chat_template False: SmolLM2-135M-Instruct measured 95 % with four examples per category as plain text, 25 %
  # through its chat template (docs/svf.md); calibrate: subtract each name's log-likelihood after "N/A".
  c.strategies = ("prompt", "classifier", "cem")  # a tuple: settable on the command line
  c.dispatch.update(category_template=DISPATCH_TEMPLATE, example_template=EXAMPLE_TEMPLATE, shots=4, examples={},
                    chat_template=False, per_token=False, calibrate=False)
  c.classifier = ml_collections.ConfigDict(dict(
      sources={}, template="cls:{prompt}=",  # the synthetic suite's classification task
      data={},  # {label: file}: the classifier's train records instead of each expert's own ("other" may be added)
      val_fraction=0.1, max_len=512,
      train=_classifier_training()))
  # The paper's CEM: population 32, 6 elites, initial mean 1/K, spread 0.5, clamp [0, 1]; 10 few-shot prompts.
  c.cem = ml_collections.ConfigDict(dict(population=32, elites=6, init_std=0.5, iters=10, n_shots=10, seed=0))
  c.cem.chunk = 4  # candidates per vmapped call on files (each holds a whole W')
  c.eval = ml_collections.ConfigDict(dict(n_per_task=500, split="test", batch_size=256, metric="exact",
                                          max_new_tokens=64))
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
