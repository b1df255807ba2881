"""Two-pass self-adaptation ("svf_adapt"): identify the task, then answer with adapted weights.

  python -m launch.eval --config=configs/svf/adapt.py:strategy=prompt --workdir=DIR

Strategies (first pass -> second pass):
  prompt      the base answers a classification prompt; its label picks an expert (or the base);
  classifier  an SVF classification expert answers the classification prompt instead;
  cem         few-shot CEM over one α per expert on `n_shots` train prompts of the task;
  cem_layer   the same with one α per expert and layer.
Mixing is z' = Σ_k α_k z_k before f (svf.model). The whole CEM population is scored in one
jitted call vmapped over candidates: build W' for each α, greedy-decode the few-shot prompts
with the KV-cache decoder, fitness = exact-match accuracy (answer tokens + eos), tie-break =
mean token log-likelihood of the correct answers (teacher-forced).
"""
from __future__ import annotations

import functools
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.decoding import generate, generate_arrays
from calm_jax.tasks import evaluate, make_eval_set
from calm_jax.registry import register_method
from svf.cem import cem
from svf.dispatch import OTHER, classify
from svf.model import adapted_params, mix
from svf.objectives import rollout_logits

STRATEGIES = ("prompt", "classifier", "cem", "cem_layer")


def stack_experts(experts: dict[str, dict]) -> dict[str, jax.Array]:
  """{expert: {target: z [L, k]}} -> {target: [K, L, k]} in the experts' (sorted) order."""
  if not experts:
    raise ValueError("adaptation needs at least one SVF expert (got K=0)")
  names = sorted(experts)
  targets = sorted(experts[names[0]])
  for n in names:
    if sorted(experts[n]) != targets:
      raise ValueError(f"expert {n!r} adapts {sorted(experts[n])}, expert {names[0]!r} adapts {targets}")
  return {t: jnp.stack([jnp.asarray(experts[n][t], jnp.float32) for n in names]) for t in targets}


def fewshot_arrays(tokenizer, examples):
  """Left-padded bos+prompt ids [S, P] + valid, answer ids (answer + eos) [S, A] + mask."""
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  prompts = [bos + tokenizer.encode(ex.prompt) for ex in examples]
  answers = [tokenizer.encode(ex.answer) + [tokenizer.eos_id] for ex in examples]
  s, p, a = len(examples), max(map(len, prompts)), max(map(len, answers))
  tok = np.full((s, p), tokenizer.pad_id, np.int32)
  val = np.zeros((s, p), bool)
  ans = np.full((s, a), tokenizer.pad_id, np.int32)
  am = np.zeros((s, a), bool)
  for i, (x, y) in enumerate(zip(prompts, answers)):
    tok[i, p - len(x):], val[i, p - len(x):] = x, True
    ans[i, :len(y)], am[i, :len(y)] = y, True
  return tok, val, ans, am


def candidate_fitness(cfg, params, factors, f, stacked, alpha, prompts, valid, answers, answer_mask, *, eos_id, pad_id):
  """(accuracy, mean log-likelihood of the correct answers) of one mixing vector α on the few-shot set."""
  p = adapted_params(params, factors, mix(stacked, alpha), f)
  gen, _, lengths = generate_arrays(cfg, p, prompts, valid, jax.random.key(0), max_new_tokens=answers.shape[1],
                                    temperature=0.0, eos_ids=(eos_id,), pad_id=pad_id)
  n = jnp.sum(answer_mask, axis=1)
  correct = jnp.all((gen == answers) | ~answer_mask, axis=1) & (lengths == n)
  logits = rollout_logits(cfg, p, prompts, valid, answers, answer_mask)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), answers[..., None], -1)[..., 0]
  ll = jnp.sum(lp * answer_mask) / jnp.sum(answer_mask)
  return jnp.mean(correct.astype(jnp.float32)), ll


@functools.partial(jax.jit, static_argnames=("cfg", "f", "eos_id", "pad_id"))
def population_fitness(cfg, params, factors, f, stacked, population, prompts, valid, answers, answer_mask, *,
                       eos_id, pad_id):
  """candidate_fitness vmapped over population [P, K] or [P, K, L]: one compiled call for all candidates."""
  one = functools.partial(candidate_fitness, cfg, params, factors, f, stacked, prompts=prompts, valid=valid,
                          answers=answers, answer_mask=answer_mask, eos_id=eos_id, pad_id=pad_id)
  return jax.vmap(one)(population)


def cem_alpha(model, tokenizer, stacked, examples, *, per_layer: bool, cfg_cem) -> tuple[np.ndarray, dict]:
  """Few-shot CEM: the α (shape [K] or [K, L]) that maximises accuracy (then log-likelihood) on `examples`."""
  k, nl = next(iter(stacked.values())).shape[:2]
  shape = (k, nl) if per_layer else (k,)
  arrays = [jnp.asarray(a) for a in fewshot_arrays(tokenizer, examples)]
  params, factors = model.base.params(), model.factors()

  def fitness(pop):
    acc, ll = population_fitness(model.config, params, factors, model.f, stacked,
                                 jnp.asarray(pop).reshape((-1,) + shape), *arrays,
                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return np.asarray(acc), np.asarray(ll)

  res = cem(fitness, int(np.prod(shape)), iters=int(cfg_cem.iters), seed=int(cfg_cem.seed), pop=int(cfg_cem.population),
            elites=int(cfg_cem.elites), init_mean=1.0 / k, init_std=float(cfg_cem.init_std), lo=0.0, hi=1.0)
  return res.best.reshape(shape), {"fewshot_accuracy": res.score[0], "fewshot_loglik": res.score[1],
                                   "iterations": len(res.history)}


def answer(model, tokenizer, examples, assignment, zs_of, *, registry=None, batch_size: int = 256):
  """Second pass: each example answered with the weights of its assignment (a key of zs_of, or None = base).

  Returns (per-task accuracy, seconds spent generating).
  """
  correct: dict[int, bool] = {}
  t = 0.0
  for key in sorted({a for a in assignment}, key=str):
    idx = [i for i, a in enumerate(assignment) if a == key]
    params = None if key is None else model.adapted_params(zs_of[key])
    gen = functools.partial(generate, model.base, temperature=0.0, params=params)
    t0 = time.time()
    _, records = evaluate(lambda prompts, n: gen(prompts, max_new_tokens=n), tokenizer, [examples[i] for i in idx],
                          batch_size=batch_size, return_predictions=True, registry=registry)
    t += time.time() - t0
    correct.update({i: r["correct"] for i, r in zip(idx, records)})
  tasks = sorted({ex.task for ex in examples})
  acc = {task: float(np.mean([correct[i] for i, ex in enumerate(examples) if ex.task == task])) for task in tasks}
  return acc, t


def adapt_and_evaluate(model, tokenizer, experts: dict[str, dict], tasks, strategy: str, config, *,
                       registry=None, classifier=None) -> dict:
  """Held-out accuracy per task with one strategy, plus first- / second-pass seconds and dispatch decisions.

  experts: {expert name: z dict}; config: the adapt config (dispatch, cem, eval blocks);
  classifier: the classification expert's z dict (strategy "classifier").
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown adaptation strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
  stacked = stack_experts(experts)
  ev = config.eval
  examples = make_eval_set(list(tasks), ev.n_per_task, split=ev.split, seed=0, registry=registry)
  info: dict = {}
  t0 = time.time()
  if strategy in ("prompt", "classifier"):
    labels = dict(config.dispatch.labels)  # label -> expert
    missing = sorted(set(labels.values()) - set(experts))
    if missing:
      raise ValueError(f"dispatch labels name experts {missing} that were not given; experts: {sorted(experts)}")
    if strategy == "classifier" and classifier is None:
      raise ValueError("strategy 'classifier' needs a classification expert (config.classifier_expert)")
    params = None if strategy == "prompt" else model.adapted_params(classifier)
    template = config.dispatch.template if strategy == "prompt" else config.classifier.template
    got = classify(model.base, tokenizer, [ex.prompt for ex in examples], template=template, labels=list(labels),
                   params=params, head_chars=int(config.dispatch.head_chars))
    assignment = [labels.get(g) if g != OTHER else None for g in got]
    zs_of = experts
    info["dispatch"] = {task: dict(Counter(str(x) for ex, x in zip(examples, assignment) if ex.task == task))
                        for task in tasks}
  else:
    zs_of, assignment = {}, []
    for task in tasks:
      shots = make_eval_set([task], int(config.cem.n_shots), split="train", seed=1, registry=registry)
      alpha, res = cem_alpha(model, tokenizer, stacked, shots, per_layer=strategy == "cem_layer", cfg_cem=config.cem)
      zs_of[task] = mix(stacked, alpha)
      info[task] = {**res, "alpha": np.asarray(alpha).tolist(), "experts": sorted(experts)}
    assignment = [ex.task for ex in examples]
  first = time.time() - t0
  acc, second = answer(model, tokenizer, examples, assignment, zs_of, registry=registry, batch_size=ev.batch_size)
  return {"accuracy": acc, "seconds": {"first_pass": first, "second_pass": second}, "info": info}


def load_experts(model, paths: dict, allow_transfer: bool = False) -> dict[str, dict]:
  from svf.train import attach_expert
  if not paths:
    raise ValueError("config.experts is empty: adaptation needs at least one SVF expert (K=0)")
  return {name: attach_expert(model, path, allow_transfer) for name, path in sorted(dict(paths).items())}


@register_method("svf_adapt")
def run(config, workdir) -> dict:
  """Held-out accuracy of one strategy vs the base on the same examples; DIR/results.json."""
  from pathlib import Path

  from calm_jax.experiment import print_table, suite_accuracy, write_results
  from calm_jax.tokenizers import load_tokenizer
  from svf.train import attach_expert, base_dir, load_svf_model, registry_for
  from calm_jax.data import named_files
  if config.data.test:  # a model and test records of one's own
    from svf.adapt_files import run_on_files
    return run_on_files(config, workdir)
  base_hf = base_dir(config)
  tokenizer = load_tokenizer(base_hf)
  registry = registry_for(config)
  model = load_svf_model(config, base_hf)
  paths = named_files(config.experts, "config.experts") or {
      t: str(Path(config.experts_dir) / t / "expert.safetensors") for t in config.expert_tasks}
  experts = load_experts(model, paths, config.allow_transfer)
  classifier = None
  if config.strategy == "classifier":
    path = config.classifier_expert or Path(config.experts_dir) / "classifier" / "expert.safetensors"
    classifier = attach_expert(model, path, config.allow_transfer)
  tasks = list(config.tasks)
  res = adapt_and_evaluate(model, tokenizer, experts, tasks, config.strategy, config, registry=registry,
                           classifier=classifier)
  base = suite_accuracy(model.base, tokenizer, tasks, n_per_task=config.eval.n_per_task, split=config.eval.split,
                        batch_size=config.eval.batch_size, registry=registry)
  out = {"strategy": config.strategy, "accuracy": res["accuracy"], "base": {t: base[t] for t in tasks},
         "seconds": res["seconds"], "info": res["info"], "experts": sorted(experts)}
  if workdir:
    write_results(Path(workdir), out)
  print_table(f"Transformer² two-pass adaptation ({config.strategy}): test accuracy (%)",
              {"base": out["base"], config.strategy: out["accuracy"]})
  print(f"first pass {res['seconds']['first_pass']:.2f} s, second pass {res['seconds']['second_pass']:.2f} s")
  return out
