"""First pass of Transformer²'s two-pass inference: which expert should answer this prompt?

Both dispatch strategies ask a model a classification prompt, `template.format(prompt=p,
head=p[:head_chars])`, and map its greedy answer to an expert by label: the longest label the
stripped answer starts with, anything else is "other" (answered by the base).
(a) prompt-based: the base model reads the classification prompt;
(b) classification expert: an SVF expert trained (with the same trainer) on `Classify`, whose
answers are the labels; its template shows it the whole prompt (`cls:{prompt}=`).

The tiny character base follows no instructions and cannot even echo a whole prompt (it was
trained to copy 3-8 lowercase letters), so its default first-pass prompt is the one request it
can serve: `copy:{head}=` with the prompt's first 3 characters, which it echoes; the leading
tag ("add", "sub", ...) is the label. An instruction-following checkpoint takes the paper's
classification prompt with `{prompt}` instead (config `dispatch.template`).
"""
from __future__ import annotations

import numpy as np

from calm_jax.decoding import generate
from calm_jax.tasks import Task, get_task

OTHER = "other"


class Classify(Task):
  """`template(prompt of task T)` -> label of T: the classification expert's training task.

  sources: {label: [task names]} ("other" may name tasks that map to no expert).
  """

  name = "svf_classify"

  def __init__(self, sources: dict, template: str = "cls:{prompt}=", registry=None, head_chars: int = 3):
    if not sources or not all(sources.values()):
      raise ValueError(f"Classify needs at least one label with tasks, got {sources}")
    check_template(template)
    self.head_chars = head_chars
    reg = dict(registry or {})
    self.template = template
    self.sources = {str(label): [reg.get(t) or get_task(t) for t in tasks] for label, tasks in sorted(sources.items())}
    self.labels = sorted(self.sources)
    self.max_prompt_chars = len(template) + max(t.max_prompt_chars for ts in self.sources.values() for t in ts)
    self.max_answer_chars = max(len(l) for l in self.labels)

  def generate(self, rng):
    label = self.labels[int(rng.integers(len(self.labels)))]
    tasks = self.sources[label]
    prompt, _ = tasks[int(rng.integers(len(tasks)))].generate(rng)
    return format_prompt(self.template, prompt, self.head_chars), label


def check_template(template: str) -> None:
  if "{prompt}" not in template and "{head}" not in template:
    raise ValueError(f"classification template {template!r} has neither a {{prompt}} nor a {{head}} field")


def format_prompt(template: str, prompt: str, head_chars: int = 3) -> str:
  """The classification prompt for `prompt` ({prompt}: all of it; {head}: its first head_chars characters)."""
  return template.format(prompt=prompt, head=prompt[:head_chars])


def parse_label(text: str, labels) -> str:
  """The longest label that the stripped answer starts with, else "other"."""
  text = text.strip()
  for label in sorted(labels, key=len, reverse=True):
    if label and text.startswith(label):
      return label
  return OTHER


def classify(model, tokenizer, prompts, *, template: str, labels, params=None, batch_size: int = 256,
             max_new_tokens: int | None = None, head_chars: int = 3) -> list[str]:
  """Labels of the prompts (strings) by one greedy generation per prompt of the classification prompt."""
  check_template(template)
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  n = max_new_tokens or max(len(l) for l in labels) + 1
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = [bos + tokenizer.encode(format_prompt(template, p, head_chars)) for p in prompts[start:start + batch_size]]
    for ids in generate(model, chunk, max_new_tokens=n, params=params):
      if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
      out.append(parse_label(tokenizer.decode(ids), labels))
  return out


def dispatch_accuracy(predicted, truth) -> float:
  return float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else 0.0


# ---- the paper's classification prompt, for instruction models: categories scored by log-likelihood ----

def category_prompt(template: str, prompt: str, categories, examples=(), example_template: str = "") -> str:
  """The classification prompt: `template` with {categories} (comma-separated), {examples} (each (prompt, label)
  through `example_template`'s {prompt} and {label}) and {prompt}."""
  shots = "".join(example_template.format(prompt=q, label=label) for q, label in examples)
  return template.format(categories=", ".join(categories), examples=shots, prompt=prompt)


def interleave_examples(examples: dict) -> list[tuple[str, str]]:
  """{label: [prompt, ...]} -> (prompt, label) pairs, one of each label in turn (sorted labels), so no
  category owns the end of the few-shot block."""
  out, lists = [], {label: list(ps) for label, ps in sorted(dict(examples).items())}
  for k in range(max((len(v) for v in lists.values()), default=0)):
    out += [(ps[k], label) for label, ps in lists.items() if k < len(ps)]
  return out


def score_categories(model, tokenizer, prompts, categories, *, template: str, examples=(), example_template: str = "",
                     params=None, chat_template="auto", per_token: bool = False, batch_size: int = 64,
                     max_len: int = 4096, calibrate: bool = False) -> tuple[list[str], np.ndarray]:
  """(label per prompt, log-likelihoods [n, C]): each category name is scored as the continuation of the
  classification prompt (Transformer²'s first pass, by likelihood instead of parsing a generation), all
  prompts × categories in one batched `calm_jax.scoring.score` call. With a chat template the prompt is the
  user turn and the name the assistant's reply; without one the name follows the prompt (a trailing space of the
  prompt moves to the front of the name).
  per_token: rank by the mean log-likelihood per token of the name instead of its sum. calibrate: subtract each
  name's log-likelihood after a content-free question ("N/A"), the model's prior for the name (contextual
  calibration, Zhao et al. 2021), so a category the model favours whatever the question does not win them all."""
  from calm_jax import scoring
  from calm_jax.data import Record, encode_prompt, template_tokenizer
  categories = list(categories)
  chat = template_tokenizer(tokenizer, chat_template) is not None
  rows, targets = [], []
  names: dict[str, list] = {}
  queries = list(prompts) + (["N/A"] if calibrate else [])
  for p in queries:
    text = category_prompt(template, p, categories, examples, example_template)
    # "Answer: " + "math" is spelled "Answer:" + " math" by BPE tokenizers: the space goes to the name
    sep = " " if not chat and text != text.rstrip() else ""
    prefix = encode_prompt(Record(prompt=text.rstrip() if sep else text, answer="-", source="dispatch"), tokenizer,
                           chat_template=chat_template, max_len=max_len)
    if sep not in names:
      names[sep] = [tokenizer.encode(sep + c) for c in categories]
    for name in names[sep]:
      rows.append(prefix + name)
      targets.append([0] * len(prefix) + [1] * len(name))
  total, count, _ = scoring.score(model, rows, targets, batch_size=batch_size, params=params)
  ll = (total / np.maximum(count, 1) if per_token else total).reshape(len(queries), len(categories))
  if calibrate:
    ll = ll[:-1] - ll[-1:]
  return [categories[i] for i in np.argmax(ll, axis=1)], ll
