"""The Transformer² experiment ("svf_suite") on the tiny base.

  python -m launch.train --config=configs/svf/suite.py --workdir=DIR

Steps (each reused when its output exists in DIR):
  1. the base: config.base_workdir/hf (trained there by the pretrain method if missing);
  2. per training task, the rows' adapters: SVF experts by REINFORCE (`objective`, DIR/experts/TASK) and
     by next-token prediction (`ntp_objective`, DIR/experts_ntp/TASK), and the LoRA baseline
     (`lora_objective`, DIR/lora/TASK: core calm_jax.lora, same matrices, same trainer and data, rank
     with >= SVF's parameter count); the classification expert (DIR/experts/classifier);
  3. test accuracy of base and every row on the training tasks;
  4. held-out tasks answered by each adaptation strategy (prompt dispatch, classification
     expert, few-shot CEM with one α per expert and per layer; the `adapt_experts` row's SVF
     experts) vs the base, first- and
     second-pass seconds, and how often each dispatcher picks the right expert on the
     training tasks' test prompts.
Writes DIR/results.json (schema in configs/svf/suite.py), DIR/results.png (held-out),
DIR/results_train.png, and prints the tables.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import ml_collections

from calm_jax.experiment import bar_chart, print_table, suite_accuracy, write_results
from calm_jax.models.decoder import param_specs
from calm_jax.registry import register_method
from calm_jax.tasks import make_eval_set
from calm_jax.tokenizers import load_tokenizer
from svf import adapt as adapt_lib
from svf import train as train_lib
from svf.dispatch import OTHER, Classify, classify, dispatch_accuracy


# the rows of the training-task table: (results key, adapter, objective config key, experts' subdirectory)
ROWS = (("svf", "svf", "objective", "experts"), ("svf_ntp", "svf", "ntp_objective", "experts_ntp"),
        ("lora", "lora", "lora_objective", "lora"))


DATA_FILE_KEYS = ("train", "val", "test", "val_fraction", "seed", "format", "chat_template", "max_len", "fields")


def expert_config(config, task: str, adapter: str, objective: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.expert.to_dict())
  c.method = "svf_expert"
  c.base_workdir = config.base_workdir
  c.pretrain = ml_collections.ConfigDict(config.pretrain.to_dict())
  c.task = task
  c.adapter = adapter
  c.objective = objective
  c.svf = ml_collections.ConfigDict(config.svf.to_dict())
  # The suite's experts keep the identity they had before the dataset-file keys existed (finished runs reuse).
  c.data = ml_collections.ConfigDict({k: v for k, v in config.data.to_dict().items() if k not in DATA_FILE_KEYS})
  del c.base
  c.classifier = ml_collections.ConfigDict(dict(sources={}, template=config.classifier.template))
  if task == Classify.name:
    labels = {label: [t] for label, t in dict(config.dispatch.labels).items()}
    c.classifier.sources = {**labels, OTHER: list(config.other_tasks)}
  if adapter == "lora" and config.lora_lr:
    c.optimizer.lr = float(config.lora_lr)
  if objective == "ntp" and config.ntp_lr:
    c.optimizer.lr = float(config.ntp_lr)
  c.quiet = True
  return c


def dispatch_truth(examples, labels: dict) -> list:
  """The right first-pass answer for each example: its expert, or None (the base) for other tasks."""
  experts = set(labels.values())
  return [ex.task if ex.task in experts else None for ex in examples]


@register_method("svf_suite")
def run(config, workdir) -> dict:
  t0 = time.time()
  workdir = Path(workdir)
  base_hf = train_lib.base_dir(config)
  tokenizer = load_tokenizer(base_hf)
  registry = train_lib.registry_for(config)
  tasks = list(config.expert_tasks)
  ev = config.eval

  runs = {}  # row -> {task: the expert run's results}
  for row, adapter, objective_key, subdir in ROWS:
    objective = config[objective_key]
    if not objective:  # "" leaves the row out
      continue
    runs[row] = {}
    for task in tasks:
      r = train_lib.run(expert_config(config, task, adapter, objective), workdir / subdir / task)
      runs[row][task] = r
      print(f"{row} ({objective}) {task}: test {r['test_accuracy']:.3f} ({r['seconds']:.0f} s)")
  adapt_row = config.adapt_experts
  if adapt_row not in runs or adapt_row == "lora":
    raise ValueError(f"config.adapt_experts={adapt_row!r}: the SVF experts that adapt must be one of the trained "
                     f"SVF rows {[r for r in runs if r != 'lora']}")
  adapt_dir = workdir / dict((r[0], r[3]) for r in ROWS)[adapt_row]
  cls_res = train_lib.run(expert_config(config, Classify.name, "svf", config.classifier_objective),
                          workdir / "experts" / "classifier")
  print(f"classification expert: test {cls_res['test_accuracy']:.3f}")

  model = train_lib.load_svf_model(config, base_hf)
  experts = {t: train_lib.attach_expert(model, adapt_dir / t / train_lib.EXPERT_NAME) for t in tasks}
  classifier = train_lib.attach_expert(model, workdir / "experts" / "classifier" / train_lib.EXPERT_NAME)
  base_train = suite_accuracy(model.base, tokenizer, tasks, n_per_task=ev.n_per_task, split=ev.split,
                              batch_size=ev.batch_size, registry=registry)
  train_tasks = {"base": {t: base_train[t] for t in tasks}}
  train_tasks.update({row: {t: r[t]["test_accuracy"] for t in tasks} for row, r in runs.items()})

  # first-pass accuracy on known prompts: the training tasks (-> their expert) and other base tasks (-> base)
  labels = dict(config.dispatch.labels)
  known = make_eval_set(tasks + list(config.other_tasks), ev.n_dispatch, split=ev.split, seed=2, registry=registry)
  truth = dispatch_truth(known, labels)
  dispatch = {}
  for name, params, template in (("prompt", None, config.dispatch.template),
                                 ("classifier", model.adapted_params(classifier), config.classifier.template)):
    got = classify(model.base, tokenizer, [ex.prompt for ex in known], template=template, labels=list(labels),
                   params=params, head_chars=int(config.dispatch.head_chars))
    dispatch[name] = dispatch_accuracy([labels.get(g) for g in got], truth)

  heldout_tasks = list(config.tasks)
  base_held = suite_accuracy(model.base, tokenizer, heldout_tasks, n_per_task=ev.n_per_task, split=ev.split,
                             batch_size=ev.batch_size, registry=registry)
  heldout = {"base": {t: base_held[t] for t in heldout_tasks}}
  seconds, info = {}, {}
  for strategy in config.strategies:
    r = adapt_lib.adapt_and_evaluate(model, tokenizer, experts, heldout_tasks, strategy, config, registry=registry,
                                     classifier=classifier)
    heldout[strategy] = r["accuracy"]
    seconds[strategy] = r["seconds"]
    info[strategy] = r["info"]
    print(f"{strategy}: {r['accuracy']}  (first pass {r['seconds']['first_pass']:.3f} s, "
          f"second pass {r['seconds']['second_pass']:.3f} s)")

  params = {"base": sum(math.prod(s.shape) for s in param_specs(model.config).values()),
            **{row: r[tasks[0]]["params"] for row, r in runs.items() if row != "svf_ntp"}}
  # The timings above include compiling each pass's programs; time one dispatch strategy again, warm.
  warm = "prompt" if "prompt" in seconds else next(iter(seconds))
  timing = adapt_lib.adapt_and_evaluate(model, tokenizer, experts, heldout_tasks, warm, config, registry=registry,
                                        classifier=classifier)["seconds"]
  out = {"train_tasks": train_tasks, "heldout": heldout, "params": params,
         "seconds": {"first_pass": timing["first_pass"], "second_pass": timing["second_pass"], "timed_strategy": warm,
                     "by_strategy_with_compile": seconds, "total": time.time() - t0},
         "dispatch_accuracy": dispatch, "classifier_test_accuracy": cls_res["test_accuracy"],
         "adaptation": info, "expert_tasks": tasks, "heldout_tasks": heldout_tasks, "adapt_experts": adapt_row,
         "objectives": {row: config[key] for row, _, key, _ in ROWS if row in runs}, "expert_runs": runs}
  write_results(workdir, out)
  print_table("training tasks: test accuracy (%)", train_tasks)
  print_table("held-out tasks, two-pass adaptation: test accuracy (%)", heldout)
  print(f"parameters: {params};  dispatch accuracy on known prompts: {dispatch}")
  print("seconds (first pass / second pass): " + ", ".join(
      f"{k} {v['first_pass']:.2f} / {v['second_pass']:.2f}" for k, v in seconds.items()))
  bar_chart(workdir / "results.png", heldout, "Transformer² on the tiny base: held-out tasks")
  bar_chart(workdir / "results_train.png", train_tasks, "SVF experts vs LoRA vs base: training tasks")
  print(f"results: {workdir / 'results.json'}  chart: {workdir / 'results.png'}  ({out['seconds']['total']:.0f} s)")
  return out
