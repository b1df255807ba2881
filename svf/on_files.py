"""An SVF expert of any model trained on dataset files of one's own (`config.base` + `config.data`):

  python -m launch.train --config=configs/svf/expert.py --config.base=smollm2-135m-instruct \\
      --config.data.train=train.jsonl --config.data.val=val.jsonl --config.eval.metric=exact --workdir=DIR

The data's metric (`config.eval.metric`: exact, number; choice with the ntp objective) is the validation
score (best z on it kept, step 0 included) and REINFORCE's reward: +1 when the sampled completion scores
under it against the record's reference, -1 when not (Transformer²'s ±1). Prompts are laid out as
training and evaluation lay them out (the tokenizer's chat template when it has one; `encode_prompt`).
`ntp` trains on the records' answer tokens (`RecordBatches`). Writes DIR/expert.safetensors and
DIR/results.json (base and expert on the validation records, the test records when data.test is set);
a finished run is reused only for the same config and data (`data_identity`).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from calm_jax import sharding
from calm_jax.data import DataError, prompt_and_reference
from calm_jax.data import metrics as M
from calm_jax.errors import UserError
from calm_jax.experiment import write_results
from calm_jax.fingerprint import fingerprint
from calm_jax.train import lm_batch_loss, train
from calm_jax.train.workdir import RunMismatchError, check_finished, differences
from calm_jax.variables import SVFParam
from svf.decompose import target_regex
from svf.expert import save_expert
from svf.model import num_params
from svf.objectives import reinforce_step_loss

GENERATED = ("exact", "number")  # metrics scored on a generated completion: REINFORCE's rewards


def base_tokenizer(base_hf):
  """The base's tokenizer, or a UserError naming the directory when it has none that loads."""
  from calm_jax.tokenizers import load_tokenizer
  try:
    return load_tokenizer(base_hf)
  except UserError:
    raise
  except Exception as e:  # transformers raises OSError / ValueError / TypeError for a missing tokenizer
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(f"base {base_hf} has no usable tokenizer (tokenizer.json, tokenizer_config.json or "
                    f"char_tokenizer.json): {type(e).__name__}: {msg}") from None


def check_references(records, metric: str) -> None:
  """A DataError naming the first record whose reference the metric can never match: empty once normalised
  (exact: punctuation and spaces only) or without a number (number). Such a record rewards nothing."""
  if metric not in GENERATED:
    return
  for r in records:
    ref = prompt_and_reference(r)[1]
    if metric == "exact" and not M.normalize(ref):
      raise DataError(f"{r.source}: the answer {ref!r} is empty after the exact metric's normalisation "
                      "(lower case, punctuation removed), so no completion could match it")
    if metric == "number" and M.last_number(ref) is None:
      raise DataError(f"{r.source}: the answer {ref!r} holds no number, so the number metric cannot score it")


def metric_reward(texts, references, metric: str) -> np.ndarray:
  """Transformer²'s reward of each completion: +1 if it scores under `metric` against its reference, else -1."""
  check = {"exact": M.exact, "number": M.number}[metric]
  return np.array([1.0 if check(t.strip(), ref) else -1.0 for t, ref in zip(texts, references)], np.float32)


def make_record_verifier(tokenizer, references, metric: str, eos_ids):
  """Host reward function for `jax.pure_callback`: (tokens [B, N], lengths [B], index [B]) -> ±1 [B], where
  index is each row's record index into `references`; a completion ends at its first end-of-sequence id."""
  eos = set(int(e) for e in eos_ids)

  def verify(tokens, lengths, index):
    texts = []
    for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
      ids = [int(t) for t in row[:int(n)]]
      cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
      texts.append(tokenizer.decode(ids[:cut]))
    return metric_reward(texts, [references[int(i)] for i in np.asarray(index)], metric)

  return verify


def left_pad(prompts, pad_id: int, width: int | None = None):
  """Token lists -> (tokens [B, P], valid [B, P]) left-padded to `width` (default the longest, rounded to 8)."""
  p = width or -(-max(map(len, prompts)) // 8) * 8
  tok = np.full((len(prompts), p), pad_id, np.int32)
  valid = np.zeros((len(prompts), p), bool)
  for i, x in enumerate(prompts):
    tok[i, p - len(x):], valid[i, p - len(x):] = x, True
  return tok, valid


def reinforce_batches(order, prompts, pad_id: int):
  """REINFORCE batches of records: `order` (a RecordBatches) picks batch `step`'s record indices, a pure
  function of (seed, step); prompt [B, P] left-padded, prompt_valid, index (the record indices)."""
  tok, valid = left_pad(prompts, pad_id)

  def batch_fn(step):
    idx = order.indices(step)
    return {"prompt": tok[idx], "prompt_valid": valid[idx], "index": idx.astype(np.int32)}

  return batch_fn


def run_on_files(config, workdir) -> dict:
  """Train one SVF expert of `config.base` on `config.data.train`; score base and expert on the val records."""
  from calm_jax.data import data_identity, encode_prompt, load_dataset_config
  from calm_jax.evaluate import check_metric, score_records
  from calm_jax.hub import model_dir
  from svf.train import EXPERT_NAME, attach_expert, base_dir, load_svf_model

  t0 = time.time()
  workdir = Path(workdir)
  ev, metric, objective = config.eval, str(config.eval.metric), str(config.objective)
  if config.adapter != "svf":
    raise UserError(f"adapter={config.adapter!r} on dataset files: train a LoRA on your files with "
                    "configs/moa/expert.py; this config trains SVF experts")
  if objective not in ("reinforce", "ntp"):
    raise UserError(f"unknown SVF objective {objective!r}: reinforce or ntp")
  allowed = GENERATED if objective == "reinforce" else GENERATED + ("choice",)
  if metric not in allowed:
    role = "reward REINFORCE" if objective == "reinforce" else "select the best SVF expert"
    raise UserError(f"config.eval.metric={metric!r} cannot {role}; use one of {', '.join(allowed)}")
  base_hf = model_dir(config.base) if config.base else base_dir(config)
  tokenizer = base_tokenizer(base_hf)
  max_len = int(config.data.max_len)
  data = load_dataset_config(config.data, tokenizer, max_len)
  split = "val" if "val" in data.records else "train"
  for name, recs in data.records.items():
    check_metric(recs, metric)
    check_references(recs, metric)
  identity = data_identity(config.data)
  expert_path, results_path = workdir / EXPERT_NAME, workdir / "results.json"
  if config.reuse and expert_path.exists() and results_path.exists():
    check_finished(workdir, config, "SVF expert")
    done = json.loads(results_path.read_text())
    diff = differences(done.get("data_identity", {}), identity)
    if diff:
      raise RunMismatchError(f"{workdir} holds an SVF expert trained on other data ({'; '.join(diff[:6])}); use a "
                             "fresh workdir, or delete it to retrain")
    return done

  mesh = sharding.make_mesh(config.mesh, batch_size=int(config.batch_size))
  model = load_svf_model(config, base_hf, mesh)
  base_fp = fingerprint(model.base.params())
  batches = data.batches("train", int(config.batch_size), seed=int(config.seed))
  if objective == "reinforce":
    rl = config.rl
    train_recs = data.records["train"]
    n_new = int(rl.max_new_tokens) or max(int(e.loss_mask.sum()) for e in data.encoded["train"])
    prompts = [encode_prompt(r, tokenizer, chat_template=config.data.chat_template, max_len=max_len - n_new)
               for r in train_recs]
    eos_ids = tuple(sorted({*model.config.eos_token_ids, tokenizer.eos_id}))
    verifier = make_record_verifier(tokenizer, [prompt_and_reference(r)[1] for r in train_recs], metric, eos_ids)
    batch_fn = reinforce_batches(batches, prompts, tokenizer.pad_id)
    loss_fn = functools.partial(reinforce_step_loss, verifier=verifier, max_new_tokens=n_new,
                                temperature=float(rl.temperature), kl_coef=float(rl.kl_coef),
                                baseline=bool(rl.baseline), eos_ids=eos_ids, pad_id=tokenizer.pad_id)
  else:
    batch_fn, loss_fn = batches, lm_batch_loss

  def score(recs, params=None) -> dict:
    return score_records(model.base, tokenizer, recs, metric, chat_template=config.data.chat_template,
                         max_len=max_len, max_new_tokens=int(ev.max_new_tokens), batch_size=int(ev.batch_size),
                         params=params)[0]

  best = {"accuracy": -1.0, "step": 0, "zs": None}

  def keep_if_best(m, step):
    acc = score(data.records[split], m.adapted_params())["accuracy"]
    if acc > best["accuracy"]:
      best.update(accuracy=acc, step=step, zs=jax.device_get(m.zs()))
    return {"val_accuracy": acc}

  # Everything is read and checked before the trainer creates the workdir: bad input writes nothing there.
  base_val = score(data.records[split])
  keep_if_best(model, 0)  # the start (z = init, W' ≈ W) is a candidate too
  result = train(model, trainable=SVFParam, loss_fn=loss_fn, batch_fn=batch_fn, config=config, workdir=workdir,
                 eval_fn=keep_if_best, mesh=mesh, meta={"base": base_fp, "targets": target_regex(config.svf.targets),
                                                        "data": identity},
                 quiet=config.quiet)
  if not int(config.eval_every):
    keep_if_best(result.model, result.step)
  if jax.process_index() == 0:
    save_expert(expert_path, best["zs"], base_fingerprint=base_fp, targets=target_regex(config.svf.targets),
                f=config.svf.f, task=str(config.data.train),
                extra={"step": best["step"], "val_accuracy": best["accuracy"], "data": str(config.data.train),
                       "metric": metric, "objective": objective, "data_identity": identity})
  model = result.model
  model.set_zs(attach_expert(model, expert_path))
  key = "accuracy"
  out = {"base": str(base_hf), "data": str(config.data.train), "split": split, "metric": metric,
         "objective": objective, f"base_{key}": base_val[key], key: best["accuracy"], "n": base_val["n"],
         "best_step": best["step"], "params": num_params(model.zs()), "steps": result.step,
         "expert": str(expert_path), "final_metrics": result.metrics, "data_identity": identity}
  if "test" in data.records:
    before, after = score(data.records["test"]), score(data.records["test"], model.adapted_params())
    out["test"] = {f"base_{key}": before[key], key: after[key], "n": after["n"]}
  out["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    write_results(workdir, out)
  print(f"{metric} on the {split} records ({out['n']}): base {out['base_accuracy']:.4g}, "
        f"base + SVF expert {out['accuracy']:.4g} (step {best['step']}); {out['params']:,} z parameters")
  print(f"expert: {expert_path}  results: {results_path}")
  return out
