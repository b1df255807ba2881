"""Two-pass self-adaptation on dataset files of one's own ("svf_adapt" with `config.data.test`):

  python -m launch.eval --config=configs/svf/adapt.py --workdir=DIR --config.base=smollm2-135m-instruct \\
      --config.experts='{"math": "runs/math/expert.safetensors", "reverse": "runs/rev/expert.safetensors"}' \\
      --config.data.test=test.jsonl --config.eval.metric=exact

Experts are {label: expert file}; test records may carry a `domain` (a label, or anything else = "other").
Strategies (`config.strategies`), each scored with the data's metric on the same test records:
  prompt      the base reads the paper's classification prompt (configs/svf/adapt.py DISPATCH_TEMPLATE, with
              `dispatch.shots` labelled examples per category); each category name (labels + "other") is
              scored by log-likelihood (svf.dispatch.score_categories); "other" keeps the base;
  classifier  an SVF classification expert, trained here (DIR/classifier) by next-token prediction on the
              union of the experts' train files, each record labelled by its expert, with the zero-shot
              classification prompt; dispatch by its category log-likelihoods;
  cem         few-shot CEM over one α per expert (cem_layer: per expert and layer) on `cem.n_shots` records
              of the test file, fitness = the metric on their greedy answers (tie-break: the mean token
              log-likelihood of their references); those records are left out of every score.
DIR/results.json: the base and each expert alone, and per strategy the metric and the dispatch accuracy
(on records with a domain).
"""
from __future__ import annotations

import functools
import json
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.data import DataError, Record, read_records
from calm_jax.errors import UserError
from svf.dispatch import OTHER, interleave_examples, score_categories
from svf.expert import read_expert

FILE_STRATEGIES = ("prompt", "classifier", "cem", "cem_layer")


def expert_train_records(paths: dict, override: dict, fmt: str = "auto", fields=None) -> dict[str, list[Record]]:
  """{label: its expert's train records}, from `override` ({label: file}, read with `fmt` / `fields`) or the
  file each expert recorded (read as it was trained on)."""
  out = {}
  for label, path in sorted(paths.items()):
    if label in override:
      out[label] = read_records(override[label], format=fmt, fields=fields)
      continue
    _, meta = read_expert(path)
    extra = json.loads(meta.get("extra") or "{}")
    ident = extra.get("data_identity") or {}
    file = ident.get("data.train") or extra.get("data")
    if not file:
      raise UserError(f"expert {label!r} ({path}) records no train file (not trained on dataset files); give "
                      f"config.classifier.data={{{label!r}: FILE}}")
    out[label] = read_records(file, format=ident.get("data.format", "auto"), fields=ident.get("data.fields"))
  for label, file in sorted(override.items()):
    if label not in out:  # e.g. "other": prompts that belong to no expert
      out[label] = read_records(file, format=fmt, fields=fields)
  return out


def prompt_text(record: Record) -> str:
  """The text a dispatcher reads: the prompt, or a chat record's last user turn."""
  if record.messages is None:
    return record.prompt
  return next(m.content for m in reversed(record.messages) if m.role == "user")


def true_route(record: Record, labels) -> str | None:
  return None if record.domain is None else (record.domain if record.domain in labels else OTHER)


def candidate_outputs(cfg, params, factors, f, stacked, alpha, prompts, valid, answers, answer_mask, *,
                      max_new_tokens: int, eos_ids, pad_id):
  """One mixing vector α: greedy answers (tokens [S, N], lengths [S]) to the shots and the mean token
  log-likelihood of their references (teacher-forced)."""
  from calm_jax.decoding import generate_arrays
  from svf.model import adapted_params, mix
  from svf.objectives import rollout_logits
  p = adapted_params(params, factors, mix(stacked, alpha), f)
  gen, _, lengths = generate_arrays(cfg, p, prompts, valid, jax.random.key(0), max_new_tokens=max_new_tokens,
                                    temperature=0.0, eos_ids=eos_ids, pad_id=pad_id)
  logits = rollout_logits(cfg, p, prompts, valid, answers, answer_mask)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), answers[..., None], -1)[..., 0]
  return gen, lengths, jnp.sum(lp * answer_mask) / jnp.sum(answer_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "f", "max_new_tokens", "eos_ids", "pad_id"))
def _outputs(cfg, params, factors, f, stacked, alphas, prompts, valid, answers, answer_mask, *, max_new_tokens,
             eos_ids, pad_id):
  one = functools.partial(candidate_outputs, cfg, params, factors, f, stacked, prompts=prompts, valid=valid,
                          answers=answers, answer_mask=answer_mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                          pad_id=pad_id)
  return jax.vmap(one)(alphas)


def cem_on_records(model, tokenizer, stacked, shots, encoded, metric: str, *, per_layer: bool, cfg_cem,
                   max_new_tokens: int, eos_ids) -> tuple[np.ndarray, dict]:
  """Few-shot CEM (svf.cem) on records: fitness = the metric on the greedy answers to the shots. The
  population is scored `cfg_cem.chunk` candidates per vmapped call (each holds a whole W')."""
  from svf.cem import cem
  from svf.on_files import left_pad, metric_reward
  from calm_jax.data import prompt_and_reference
  k, nl = next(iter(stacked.values())).shape[:2]
  shape = (k, nl) if per_layer else (k,)
  tok, valid = left_pad([list(e.ids[:e.prompt_len]) for e in encoded], tokenizer.pad_id)
  answers = [list(e.ids[e.prompt_len:]) for e in encoded]
  a = max(map(len, answers))
  ans = np.full((len(answers), a), tokenizer.pad_id, np.int32)
  am = np.zeros((len(answers), a), bool)
  for i, y in enumerate(answers):
    ans[i, :len(y)], am[i, :len(y)] = y, True
  refs = [prompt_and_reference(r)[1] for r in shots]
  params, factors = model.base.params(), model.factors()
  chunk = max(1, int(cfg_cem.chunk))
  eos = set(eos_ids)

  def fitness(pop):
    pop = np.asarray(pop, np.float32).reshape((-1,) + shape)
    acc, ll = [], []
    for s in range(0, len(pop), chunk):
      part = pop[s:s + chunk]
      padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)]) if len(part) < chunk else part
      gen, lengths, lls = jax.device_get(_outputs(
          model.config, params, factors, model.f, stacked, jnp.asarray(padded), jnp.asarray(tok), jnp.asarray(valid),
          jnp.asarray(ans), jnp.asarray(am), max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids),
          pad_id=int(tokenizer.pad_id)))
      for c in range(len(part)):
        texts = []
        for row, n in zip(gen[c], lengths[c]):
          ids = [int(t) for t in row[:int(n)]]
          texts.append(tokenizer.decode([t for t in ids if t not in eos]))
        acc.append(float(np.mean(metric_reward(texts, refs, metric) > 0)))
        ll.append(float(lls[c]))
    return np.asarray(acc), np.asarray(ll)

  res = cem(fitness, int(np.prod(shape)), iters=int(cfg_cem.iters), seed=int(cfg_cem.seed),
            pop=int(cfg_cem.population), elites=int(cfg_cem.elites), init_mean=1.0 / k,
            init_std=float(cfg_cem.init_std), lo=0.0, hi=1.0)
  return res.best.reshape(shape), {"fewshot_accuracy": res.score[0], "fewshot_loglik": res.score[1],
                                   "iterations": len(res.history)}


def train_classifier(config, base_hf, labelled: dict[str, list[Record]], categories, workdir: Path,
                     template: str) -> Path:
  """The classification expert: an SVF expert (svf.on_files, objective ntp) of the base on the records'
  zero-shot classification prompts, answered by their labels; reused for the same data (DIR/classifier)."""
  import ml_collections

  from svf.dispatch import category_prompt
  from svf.on_files import run_on_files
  rows = [{"prompt": category_prompt(template, prompt_text(r), categories), "answer": label}
          for label, recs in sorted(labelled.items()) for r in recs]
  workdir.mkdir(parents=True, exist_ok=True)
  data = workdir.parent / "classifier_data.jsonl"
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  if not data.exists() or data.read_text() != text:
    from calm_jax.atomic import atomic_write_text
    atomic_write_text(data, text)
  cfg = ml_collections.ConfigDict(config.classifier.train.to_dict())
  cfg.base = str(base_hf)
  cfg.data.update(train=str(data), val="", test="", val_fraction=float(config.classifier.val_fraction),
                  chat_template=config.data.chat_template, max_len=int(config.classifier.max_len),
                  fields=dict(prompt="prompt", answer="answer", messages="messages", domain="domain",
                              choices="choices"))
  cfg.svf = ml_collections.ConfigDict(config.svf.to_dict())
  cfg.eval.metric = "exact"
  run_on_files(cfg, workdir)
  return workdir / "expert.safetensors"


def run_on_files(config, workdir) -> dict:
  """Every configured strategy on `config.data.test`, beside the base and each expert alone."""
  from calm_jax.data import encode_record, prompt_and_reference
  from calm_jax.evaluate import check_metric, score_records
  from calm_jax.experiment import print_table, write_results
  from calm_jax.hub import model_dir
  from calm_jax.tokenizers import CharTokenizer
  from svf.adapt import stack_experts
  from svf.on_files import base_tokenizer, check_references
  from svf.train import attach_expert, base_dir, load_svf_model

  t0 = time.time()
  workdir = Path(workdir)
  metric = str(config.eval.metric)
  if metric not in ("exact", "number"):
    raise UserError(f"config.eval.metric={metric!r}: adaptation on files scores generated answers (exact, number)")
  strategies = list(config.strategies)
  bad = [s for s in strategies if s not in FILE_STRATEGIES]
  if bad or not strategies:
    raise UserError(f"config.strategies {strategies}: choose from {', '.join(FILE_STRATEGIES)}")
  from calm_jax.data import named_files
  paths = named_files(config.experts, "config.experts")
  if not paths:
    raise UserError("config.experts is empty: give {label: expert.safetensors}, e.g. --config.experts="
                    "'{\"math\": \"runs/math/expert.safetensors\", \"code\": \"runs/code/expert.safetensors\"}'")
  if OTHER in paths:
    raise UserError(f"config.experts: {OTHER!r} is the label of prompts that keep the base; rename that expert")
  base_hf = model_dir(config.base) if config.base else base_dir(config)
  tokenizer = base_tokenizer(base_hf)
  d = config.data
  records = read_records(d.test, format=d.format, fields=dict(d.fields))
  check_metric(records, metric)
  check_references(records, metric)
  labels = sorted(paths)
  categories = labels + [OTHER]
  model = load_svf_model(config, base_hf)
  experts = {label: attach_expert(model, p, config.allow_transfer) for label, p in sorted(paths.items())}
  classifier_data = named_files(config.classifier.data, "config.classifier.data")
  labelled = (expert_train_records(paths, classifier_data, d.format, dict(d.fields))
              if "classifier" in strategies or (int(config.dispatch.shots) and not dict(config.dispatch.examples))
              else {})
  max_len, n_new = int(d.max_len), int(config.eval.max_new_tokens)
  # Few-shot records for CEM come out of the test file (seeded) and out of every score below.
  cem_wanted = [s for s in strategies if s.startswith("cem")]
  k_shots = int(config.cem.n_shots) if cem_wanted else 0
  if k_shots >= len(records):
    raise DataError(f"{d.test}: {len(records)} records, but cem.n_shots={k_shots} of them are needed as shots and "
                    "at least one must remain to score")
  perm = np.random.default_rng(int(config.cem.seed)).permutation(len(records))
  shot_idx, eval_idx = sorted(perm[:k_shots].tolist()), sorted(perm[k_shots:].tolist())
  shots, test = [records[i] for i in shot_idx], [records[i] for i in eval_idx]

  def scores(params=None, recs=test) -> np.ndarray:
    if not recs:
      return np.zeros(0)
    _, rows = score_records(model.base, tokenizer, recs, metric, chat_template=d.chat_template, max_len=max_len,
                            max_new_tokens=n_new, batch_size=int(config.eval.batch_size), params=params)
    return np.array([r["score"] for r in rows])

  def routed(route: list) -> np.ndarray:
    """Each test record answered by the weights its route names (None / "other": the base)."""
    out = np.zeros(len(test))
    for key in sorted(set(route), key=str):
      idx = [i for i, r in enumerate(route) if r == key]
      params = None if key in (None, OTHER) else model.adapted_params(zs_of[key])
      out[idx] = scores(params, [test[i] for i in idx])
    return out

  truth = [true_route(r, labels) for r in test]
  known = [i for i, t in enumerate(truth) if t is not None]
  out = {"base_model": str(base_hf), "data": str(d.test), "metric": metric, "n": len(test), "cem_shots": len(shots),
         "experts": {label: str(p) for label, p in sorted(paths.items())}}
  zs_of = dict(experts)
  out["base"] = float(scores().mean())
  out["expert_alone"] = {label: float(scores(model.adapted_params(z)).mean()) for label, z in experts.items()}
  strat: dict = {}
  prompts = [prompt_text(r) for r in test]
  for s in strategies:
    t1 = time.time()
    if s in ("prompt", "classifier"):
      if s == "prompt" and isinstance(tokenizer, CharTokenizer):
        strat[s] = {"skipped": "the character-level base cannot read a classification prompt; its tag-echo "
                               "stand-in serves the synthetic suite (configs/svf/suite.py)"}
        continue
      if s == "prompt":
        examples = dict(config.dispatch.examples) or {
            label: [prompt_text(r) for r in recs[:int(config.dispatch.shots)]] for label, recs in labelled.items()}
        route, _ = score_categories(model.base, tokenizer, prompts, categories,
                                    template=config.dispatch.category_template, examples=interleave_examples(examples),
                                    example_template=config.dispatch.example_template,
                                    chat_template=config.dispatch.chat_template,
                                    per_token=bool(config.dispatch.per_token),
                                    calibrate=bool(config.dispatch.calibrate))
      else:
        # the paper's classification prompt; the character-level base's alphabet cannot spell it: its suite template
        template = (config.classifier.template if isinstance(tokenizer, CharTokenizer)
                    else config.dispatch.category_template)
        path = config.classifier_expert or train_classifier(config, base_hf, labelled, categories,
                                                            workdir / "classifier", template)
        cls = model.adapted_params(attach_expert(model, path, config.allow_transfer))
        route, _ = score_categories(model.base, tokenizer, prompts, categories, template=template,
                                    params=cls, chat_template=config.data.chat_template)
      first = time.time() - t1
      acc = routed(route)
      strat[s] = {"accuracy": float(acc.mean()), "routes": dict(Counter(route)),
                  "dispatch_accuracy": float(np.mean([route[i] == truth[i] for i in known])) if known else None,
                  "first_pass_seconds": first}
    else:
      from svf.model import mix
      stacked = stack_experts(experts)
      encoded = [encode_record(r, tokenizer, chat_template=d.chat_template, max_len=max_len) for r in shots]
      eos_ids = tuple(sorted({*model.config.eos_token_ids, tokenizer.eos_id}))
      alpha, info = cem_on_records(model, tokenizer, stacked, shots, encoded, metric, per_layer=s == "cem_layer",
                                   cfg_cem=config.cem, max_new_tokens=n_new, eos_ids=eos_ids)
      zs_of[s] = mix(stacked, alpha)
      acc = routed([s] * len(test))
      strat[s] = {"accuracy": float(acc.mean()), "alpha": np.asarray(alpha).tolist(), "experts": sorted(experts),
                  **info, "first_pass_seconds": time.time() - t1}
  out["strategies"] = strat
  out["seconds"] = time.time() - t0
  if workdir and jax.process_index() == 0:
    write_results(workdir, out)
  rows = {"base": {metric: out["base"]}, **{f"expert {k}": {metric: v} for k, v in out["expert_alone"].items()},
          **{f"T² {k}": {metric: v["accuracy"]} for k, v in strat.items() if "accuracy" in v}}
  print_table(f"Transformer² on {d.test} ({len(test)} records): {metric} (%)", rows)
  for k, v in strat.items():
    if v.get("dispatch_accuracy") is not None:
      print(f"{k} dispatch accuracy: {v['dispatch_accuracy']:.3f}")
  return out
