"""CALM on models and dataset files of one's own (method "calm_compose", configs/calm/compose.py).

  python -m launch.train --config=configs/calm/compose.py --workdir=W --config.anchor=smollm2-135m-instruct \\
      --config.augmenting=runs/demo/base/hf --config.data.train=train.jsonl --config.data.val=val.jsonl

The anchor and every augmenting model (directories, fetched names or Hub ids) stay frozen; an augmenting
model with another tokenizer reads its own tokenization of the same text (calm/spans.py). Only the
composition (`ComposeParam`) trains, with the core trainer, on the answer tokens of the anchor. Writes
W/compose (compose.safetensors + compose.json, atomically) and W/results.json: the anchor alone and the
composition, scored on the val records (greedy, `exact` or `number`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from calm.compose import AugStream, Composed, forward
from calm.spans import ComposedRecord, composed_prompt, cut_prompt, encode_composed, pad_keys
from calm_jax import hf
from calm_jax.atomic import atomic_dir
from calm_jax.data import RecordBatches, data_identity, load_dataset_config, prompt_and_reference
from calm_jax.data import metrics as M
from calm_jax.errors import UserError
from calm_jax.experiment import write_results
from calm_jax.fingerprint import fingerprint
from calm_jax.registry import register_method
from calm_jax.tokenizers import CharTokenizer, load_tokenizer
from calm_jax.train import lm_loss, train
from calm_jax.variables import ComposeParam

COMPOSE_WEIGHTS, COMPOSE_CONFIG = "compose.safetensors", "compose.json"


def same_tokenizer(a, b) -> bool:
  """Whether two tokenizers give the same tokens (same vocabulary, rules and special ids)."""
  if isinstance(a, CharTokenizer) or isinstance(b, CharTokenizer):
    return a == b
  return ((a.bos_id, a.eos_id, a.pad_id) == (b.bos_id, b.eos_id, b.pad_id)
          and a.hf.backend_tokenizer.to_str() == b.hf.backend_tokenizer.to_str()
          and getattr(a.hf, "chat_template", None) == getattr(b.hf, "chat_template", None))


def shares_tokens(anchor, anchor_tok, aug, aug_tok) -> bool:
  """An augmenting model reads the anchor's tokens (today's path) when tokenizer and vocabulary agree."""
  specials = ("vocab_size", "bos_token_id", "eos_token_ids", "pad_token_id")
  return same_tokenizer(anchor_tok, aug_tok) and all(getattr(anchor.config, s) == getattr(aug.config, s)
                                                    for s in specials)


class ComposedBatches:
  """Batch `step` of composed records: `RecordBatches`' anchor arrays (its order: a pure function of seed and step)
  plus `ends` [B, T] (the anchor's end keys) and `streams` (per augmenting model None, or its right-padded
  tokens / valid / positions / ends [B, S_m])."""

  def __init__(self, rows: list[ComposedRecord], batch_size: int, seed: int, pad_id: int, aug_pad_ids):
    longest = lambda lens: -(-max(lens) // 8) * 8
    self.rows, self.aug_pad_ids = rows, list(aug_pad_ids)
    self.t = longest([len(r.anchor.ids) for r in rows])
    self.s = [None if rows[0].augs[m] is None else longest([len(r.augs[m][0]) for r in rows])
              for m in range(len(self.aug_pad_ids))]
    self.base = RecordBatches([r.anchor for r in rows], batch_size, self.t, pad_id, seed)

  def __call__(self, step: int) -> dict:
    idx = self.base.indices(step)
    batch = self.base.batch(step)
    rows = [self.rows[i] for i in idx]
    batch["ends"] = np.stack([pad_keys(r.ends, self.t, left=False) for r in rows])
    streams = []
    for m, s in enumerate(self.s):
      if s is None:
        streams.append(None)
        continue
      tokens, valid = np.full((len(rows), s), self.aug_pad_ids[m], np.int32), np.zeros((len(rows), s), bool)
      for i, r in enumerate(rows):
        tokens[i, :len(r.augs[m][0])], valid[i, :len(r.augs[m][0])] = r.augs[m][0], True
      streams.append({"tokens": tokens, "valid": valid, "positions": np.broadcast_to(np.arange(s), tokens.shape).copy(),
                      "ends": np.stack([pad_keys(r.augs[m][1], s, left=False) for r in rows])})
    batch["streams"] = tuple(streams)
    return batch


def _streams(batch):
  if not any(s is not None for s in batch["streams"]):
    return None
  return tuple(None if s is None else AugStream(s["tokens"], s["valid"], s["positions"], s["ends"])
               for s in batch["streams"])


def composed_loss(model: Composed, batch, rng):
  """Next-token cross-entropy on the anchor's answer tokens of the composed model."""
  logits, _ = forward(model.spec, model.params(), jnp.asarray(batch["inputs"]),
                      valid=jnp.asarray(batch["attention_mask"]).astype(bool), streams=_streams(batch),
                      ends=jnp.asarray(batch["ends"]))
  return lm_loss(logits, batch["targets"], batch["loss_mask"])


def _model_dir(name: str, config, workdir: Path) -> Path:
  """A model name of the config: "embedded" is the character-level base of `config.base_workdir`."""
  from calm_jax.hub import model_dir
  if name == "embedded":
    from calm_jax.pretrain import base_hf_dir
    return base_hf_dir(config.base_workdir, config.pretrain, fallback=workdir / "base")
  return model_dir(name)


def save_compose(out_dir, model: Composed, meta: dict) -> Path:
  """compose.safetensors ("m/name": the stacked connection parameters of augmenting model m) + compose.json."""
  from safetensors.numpy import save_file
  flat = {f"{m}/{k}": np.ascontiguousarray(np.asarray(jax.device_get(v)))
          for m, p in enumerate(model.compose_params()) for k, v in p.items()}
  with atomic_dir(out_dir, overwrite=True) as tmp:
    save_file(flat, str(tmp / COMPOSE_WEIGHTS))
    (tmp / COMPOSE_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
  return Path(out_dir)


def score_composed(model: Composed, anchor_tok, aug_toks, records, metric: str, *, chat_template, max_len: int,
                   max_new_tokens: int, batch_size: int) -> dict:
  """{"accuracy", "n", "metric"} of the composition's greedy answers (iterative decoding with every cache)."""
  from calm.decoding import generate as shared_generate
  from calm.text_decoding import generate as text_generate
  spec, params = model.spec, model.params()
  eos = sorted({*spec.anchor.eos_token_ids, anchor_tok.eos_id})
  keep = int(max_len) - int(max_new_tokens)
  prompts = [cut_prompt(composed_prompt(prompt_and_reference(r)[0], anchor_tok, aug_toks, chat_template), keep)
             for r in records]
  order = sorted(range(len(records)), key=lambda i: len(prompts[i].anchor[0]))
  generated = [None] * len(records)
  for s in range(0, len(order), int(batch_size)):
    idx = order[s:s + int(batch_size)]
    if any(t is not None for t in aug_toks):
      outs = text_generate(spec, params, [prompts[i] for i in idx], anchor_tok, aug_toks,
                           max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=anchor_tok.pad_id,
                           aug_pad_ids=[None if t is None else t.pad_id for t in aug_toks])
    else:
      outs = shared_generate(spec, params, [prompts[i].anchor[0] for i in idx], max_new_tokens=max_new_tokens,
                             eos_token_id=eos)
    for i, toks in zip(idx, outs):
      generated[i] = anchor_tok.decode([t for t in toks if t not in eos]).strip()
  check = M.exact if metric == "exact" else M.number
  scores = [float(check(g, prompt_and_reference(r)[1])) for r, g in zip(records, generated)]
  return {"accuracy": float(np.mean(scores)), "n": len(records), "metric": metric, "examples": [
      {"generated": g, "reference": prompt_and_reference(r)[1]} for r, g in list(zip(records, generated))[:5]]}


@register_method("calm_compose")
def run(config, workdir) -> dict:
  """Compose config.anchor with config.augmenting, train the composition on data.train, score on data.val."""
  from calm_jax.evaluate import check_metric, score_records
  t0 = time.time()
  workdir = Path(workdir)
  if not config.anchor:
    raise UserError("config.anchor is not set: a model directory, a fetched model name or a Hub id")
  if not list(config.augmenting):
    raise UserError("config.augmenting is empty: give a list of models (directories, fetched names, Hub ids, "
                    "or 'embedded' for the character-level base)")
  if config.eval.metric not in ("exact", "number"):
    raise UserError(f"config.eval.metric {config.eval.metric!r}: calm_compose scores 'exact' or 'number'")
  anchor_dir = _model_dir(str(config.anchor), config, workdir)
  aug_dirs = [_model_dir(str(a), config, workdir) for a in config.augmenting]
  anchor_tok = load_tokenizer(anchor_dir)
  tokens = [load_tokenizer(d) for d in aug_dirs]
  max_len, ct = int(config.data.max_len), config.data.chat_template
  data = load_dataset_config(config.data, anchor_tok, max_len)  # every record read and checked first
  split = "val" if "val" in data.records else "train"
  check_metric(data.records[split], config.eval.metric)
  anchor = hf.load(anchor_dir)
  augments = [hf.load(d) for d in aug_dirs]
  own = [not shares_tokens(anchor, anchor_tok, a, t) for a, t in zip(augments, tokens)]
  aug_toks = [t if o else None for t, o in zip(tokens, own)]
  rows = [encode_composed(r, anchor_tok, aug_toks, chat_template=ct, max_len=max_len) for r in data.records["train"]]
  for r in data.records[split]:  # the val prompts too, before anything trains
    composed_prompt(prompt_and_reference(r)[0], anchor_tok, aug_toks, ct)
  c = config.compose
  layers = lambda x: [list(x)] * len(augments) if len(x) else None
  model = Composed(anchor, augments, augment_layers=layers(c.augment_layers), anchor_layers=layers(c.anchor_layers),
                   num_heads=c.num_heads or None, seed=int(config.train.seed), cross_null=bool(c.cross_null),
                   own_tokens=own)
  batches = ComposedBatches(rows, int(config.train.batch_size), int(config.train.seed), anchor_tok.pad_id,
                            [None if t is None else t.pad_id for t in aug_toks])
  identity = data_identity(config.data)
  result = train(model, trainable=ComposeParam, loss_fn=composed_loss, batch_fn=batches, config=config.train,
                 workdir=workdir, meta={"data": identity})
  model = result.model
  meta = {"anchor": str(config.anchor), "augmenting": [str(a) for a in config.augmenting], "own_tokens": own,
          "connections": [list(map(list, x)) for x in model.spec.connections], "num_heads": model.spec.num_heads,
          "cross_null": model.spec.cross_null, "anchor_fingerprint": fingerprint(anchor.params()),
          "augmenting_fingerprints": [fingerprint(a.params()) for a in augments], "data_identity": identity,
          "steps": int(config.train.steps), "final_loss": result.metrics.get("loss")}
  ev = config.eval
  kw = dict(chat_template=ct, max_len=max_len, max_new_tokens=int(ev.max_new_tokens), batch_size=int(ev.batch_size))
  records = data.records[split]
  alone, _ = score_records(anchor, anchor_tok, records, ev.metric, **kw)
  composed = score_composed(model, anchor_tok, aug_toks, records, ev.metric, **kw)
  out_dir = None
  if jax.process_index() == 0:
    out_dir = save_compose(workdir / "compose", model, meta)
  out = {"anchor": {"accuracy": alone["accuracy"]}, "composed": {"accuracy": composed["accuracy"]},
         "metric": ev.metric, "split": split, "n": composed["n"], "own_tokens": own, "compose": str(out_dir),
         "trained_params": int(sum(np.size(x) for x in jax.tree.leaves(model.compose_params()))),
         "final_loss": meta["final_loss"], "examples": composed["examples"], "seconds": time.time() - t0}
  if jax.process_index() == 0:
    write_results(workdir, out)
  print(f"{ev.metric} on the {split} records ({out['n']}): anchor {alone['accuracy']:.4g}, "
        f"composed {composed['accuracy']:.4g} (augmenting models with their own tokenizer: {own})")
  print(f"composition: {out_dir}  results: {workdir / 'results.json'}")
  return out
