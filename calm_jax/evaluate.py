"""Evaluate a model on the synthetic suite or on a dataset file (what launch/eval.py calls).

A checkpoint trained on the suite records the task settings it learned (`tasks.TASK_SETTINGS_FILE`,
e.g. 2-digit addition for the tiny base); they are what its tasks are scored on unless `task_args`
says otherwise, so a score is never of a task the model was not trained on by accident.
"""
from __future__ import annotations

import numpy as np

from calm_jax import hf
from calm_jax.experiment import print_table, suite_accuracy, write_results
from calm_jax.tasks import TASK_SETTINGS_FILE, TASKS, load_task_settings, task_registry
from calm_jax.tokenizers import load_tokenizer


def evaluate_checkpoint(model_dir, *, tasks=None, n_per_task=200, split="test", workdir=None,
                        batch_size=256, task_args=None) -> dict:
  """Exact-match accuracy per task of the model in `model_dir`; `task_args` ({task: {arg: value}})
  override the recorded settings task by task."""
  model = hf.load(model_dir)
  tokenizer = load_tokenizer(model_dir)
  settings = load_task_settings(model_dir)
  args = {**(settings or {}).get("task_args", {}), **dict(task_args or {})}
  if settings is not None:
    print(f"task settings from {model_dir}/{TASK_SETTINGS_FILE}: {settings['task_args'] or 'defaults'}")
  tasks = list(tasks or TASKS)
  acc = suite_accuracy(model, tokenizer, tasks, n_per_task=n_per_task, split=split, batch_size=batch_size,
                       registry=task_registry(args))
  print_table(f"{model_dir} on the {split} split (%)", {"model": acc})
  if workdir:
    write_results(workdir, {"accuracy": acc, "model": str(model_dir), "split": split, "task_args": args})
  return acc


def evaluate_dataset(model_name, data, metric: str, out, *, fmt: str = "auto", fields=None, chat_template="auto",
                     max_len: int = 2048, max_new_tokens: int = 256, batch_size: int = 8, dtype: str = "float32",
                     overwrite: bool = False) -> dict:
  """Scores the model `model_name` (a directory, fetched name or Hub id) on the records of `data` with
  `metric` (`calm_jax.data.metrics`), and writes `out/results.json` ({"accuracy"} or {"ppl"}, "n", ...)
  and `out/predictions.jsonl` (prompt, generated, reference, score, source per record) atomically."""
  import json

  from calm_jax.atomic import atomic_dir, check_output
  from calm_jax.data import DataError, prompt_and_reference, read_records
  from calm_jax.data import metrics as M

  if metric not in M.METRICS:
    raise DataError(f"metric {metric!r}: expected one of {', '.join(M.METRICS)}")
  out = check_output(out, overwrite=overwrite, inputs=[data])
  records = read_records(data, format=fmt, fields=fields)
  check_metric(records, metric)
  model = hf.load(model_name, dtype=dtype)
  tokenizer = load_tokenizer(model_name)
  results, rows = score_records(model, tokenizer, records, metric, chat_template=chat_template, max_len=max_len,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"{metric} on {data}")
  results = {**results, "model": str(model_name), "data": str(data)}
  with atomic_dir(out, overwrite=overwrite, inputs=[data]) as tmp:
    (tmp / "results.json").write_text(json.dumps(results, indent=2))
    with open(tmp / "predictions.jsonl", "w") as f:
      for r, row in zip(records, rows):
        prompt = prompt_and_reference(r)[0]
        text = prompt.prompt if prompt.messages is None else [m._asdict() for m in prompt.messages]
        f.write(json.dumps({"prompt": text, **row, "source": r.source}, ensure_ascii=False) + "\n")
  shown = {k: v for k, v in results.items() if k in ("accuracy", "accuracy_norm", "ppl", "n")}
  print(f"{metric} on {data}: {shown} -> {out}")
  return results


def check_metric(records, metric: str) -> None:
  """A DataError before any model loads when `records` cannot be scored with `metric`."""
  from calm_jax.data import DataError
  from calm_jax.data import metrics as M
  if metric not in M.METRICS:
    raise DataError(f"metric {metric!r}: expected one of {', '.join(M.METRICS)}")
  if metric == "choice":
    missing = [r.source for r in records if r.choices is None]
    if missing:
      raise DataError(f"{missing[0]}: metric 'choice' needs a 'choices' field in every record "
                      f"({len(missing)} of {len(records)} have none)")


def score_records(model, tokenizer, records, metric: str, *, chat_template="auto", max_len: int = 2048,
                  max_new_tokens: int = 256, batch_size: int = 8, params=None, desc: str | None = None,
                  generate_fn=None):
  """(results {"accuracy"[, "accuracy_norm"] or "ppl", "tokens"; "n", "metric"}, a row per record) of an
  in-memory model (`params` overrides its weights): what `evaluate_dataset` and the methods' validation use.

  Prompts are laid out as training lays them out (the tokenizer's chat template when it has one,
  `chat_template`); answers are greedy, through the batched KV-cache decoder, up to the first EOS.
  `generate_fn(prompts, max_new_tokens, eos_ids) -> new token lists` replaces that decoder for `exact` and
  `number` (a routed mixture of experts decides its route per batch, for example)."""
  from tqdm import tqdm

  from calm_jax import decoding, scoring
  from calm_jax.data import encode_prompt, encode_record, prompt_and_reference
  from calm_jax.data import metrics as M

  check_metric(records, metric)
  if generate_fn is not None and metric not in ("exact", "number"):
    raise ValueError(f"generate_fn serves the generated metrics (exact, number), not {metric!r}")
  bar = tqdm(total=len(records), desc=desc or metric, unit="record", disable=desc is None)
  rows = []
  if metric in ("exact", "number"):
    prompts = [encode_prompt(r, tokenizer, chat_template=chat_template, max_len=max_len - max_new_tokens)
               for r in records]
    eos = sorted({*model.config.eos_token_ids, tokenizer.eos_id})
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    generated = [None] * len(records)
    if generate_fn is None:
      generate_fn = lambda p, n, e: decoding.generate(model, p, max_new_tokens=n, eos_token_id=e, params=params)
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      outs = generate_fn([prompts[i] for i in idx], max_new_tokens, eos)
      for i, toks in zip(idx, outs):
        generated[i] = tokenizer.decode([t for t in toks if t not in eos]).strip()
      bar.update(len(idx))
    check = M.exact if metric == "exact" else M.number
    for r, g in zip(records, generated):
      ref = prompt_and_reference(r)[1]
      rows.append({"generated": g, "reference": ref, "score": float(check(g, ref))})
    results = {"accuracy": float(np.mean([x["score"] for x in rows]))}
  elif metric == "choice":
    pairs = [(i, c) for i, r in enumerate(records) for c in r.choices]
    enc = [encode_record(_with_answer(records[i], c), tokenizer, chat_template=chat_template, max_len=max_len)
           for i, c in pairs]
    total, _, _ = scoring.score(model, [e.ids for e in enc], [e.loss_mask for e in enc], batch_size=batch_size,
                                params=params)
    logliks = [[] for _ in records]
    for (i, _), v in zip(pairs, total):
      logliks[i].append(float(v))
    bar.update(len(records))
    acc, acc_norm, picks, picks_norm = M.choice_accuracy(logliks, [r.choices for r in records],
                                                         [r.label for r in records])
    for r, ll, p, pn in zip(records, logliks, picks, picks_norm):
      rows.append({"generated": r.choices[p], "reference": r.choices[r.label], "score": float(p == r.label),
                   "score_norm": float(pn == r.label), "logliks": ll})
    results = {"accuracy": acc, "accuracy_norm": acc_norm}
  else:  # ppl
    enc = [encode_record(r, tokenizer, chat_template=chat_template, max_len=max_len) for r in records]
    total, count, _ = scoring.score(model, [e.ids for e in enc], [e.loss_mask for e in enc], batch_size=batch_size,
                                    params=params, progress=bar.update)
    for r, v, n in zip(records, total, count):
      rows.append({"generated": None, "reference": prompt_and_reference(r)[1],
                   "score": float(np.exp(-v / n)) if n else float("nan"), "tokens": int(n)})
    results = {"ppl": M.perplexity(-total, count), "tokens": int(count.sum())}
  bar.close()
  return {**results, "n": len(records), "metric": metric}, rows


def _with_answer(record, answer: str):
  """The record with `answer` as its answer (one choice of a multiple-choice record)."""
  import dataclasses
  from calm_jax.data import Message
  if record.messages is None:
    return dataclasses.replace(record, answer=answer)
  last = max(k for k, m in enumerate(record.messages) if m.role == "assistant")
  return dataclasses.replace(record, messages=record.messages[:last] + (Message("assistant", answer),))
