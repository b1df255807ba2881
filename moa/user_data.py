"""The MoA experiment on a model and dataset files of one's own: one file per domain.

  python -m launch.train --config=configs/moa/suite.py --workdir=DIR --config.base=smollm2-135m-instruct \\
      --config.data.domains='{"math": "math.jsonl", "code": "code.jsonl"}' --config.data.val_fraction=0.1

Domain X is the name of its file (`config.data.domains`: {name: file}); its records are split by
`data.val_domains` ({name: file}) or `data.val_fraction`. The steps are the suite's (moa/suite.py), on records:
a LoRA per domain file, one LoRA on their union (as many steps as all experts together), the routers trained on
the union with the file names as labels (LM + γ·CE), the separate classifier; then every mode scored with the
data's metric on each domain's validation records, routed from the prompt alone (no labels), and the routers'
accuracy per layer. Writes DIR/results.json and DIR/results.png like the suite.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calm_jax import hf
from calm_jax.data import DataError, RecordBatches, data_identity, encode_prompt, load_dataset_config, named_files
from calm_jax.decoding import generate
from calm_jax.evaluate import check_metric, score_records
from calm_jax.experiment import bar_chart, print_table, write_results
from calm_jax.hub import model_dir
from calm_jax.lora import LoRAModel, load_adapter
from calm_jax.pretrain import base_hf_dir
from calm_jax.tokenizers import load_tokenizer
from moa import evaluate as E
from moa import routers as R
from moa.experts import load_experts
from moa.lora_training import train_lora

MODES = ("moa_layer", "moa_vote", "moa_last", "single_lora", "oracle", "classifier")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclasses.dataclass(frozen=True)
class DomainData:
  """Each domain's training rows (tokens) and validation records, with one shared row length."""

  domains: tuple[str, ...]
  train: dict[str, list]   # name -> [EncodedRecord] with domain = name
  val: dict[str, list]     # name -> [Record] with domain = name
  identity: dict[str, dict]
  seq_len: int
  pad_id: int

  def batches(self, names, batch_size: int, seed: int) -> RecordBatches:
    """Batches over the union of `names`' training rows, labelled by their index in `domains`."""
    rows = [e for d in names for e in self.train[d]]
    return RecordBatches(rows, batch_size, self.seq_len, self.pad_id, seed, domains=self.domains)


def domain_files(data_cfg) -> tuple[dict[str, str], dict[str, str]]:
  """({domain: train file}, {domain: val file}) from the config, checked before any model loads."""
  files = named_files(data_cfg.domains, "data.domains")
  val_files = named_files(data_cfg.get("val_domains") or {}, "data.val_domains")
  unknown = sorted(set(val_files) - set(files))
  if unknown:
    raise DataError(f"data.val_domains names {unknown[0]!r}, which is not in data.domains ({', '.join(files)})")
  if len(files) < 2:
    raise DataError(f"data.domains needs at least two domains for a mixture, got {sorted(files)}")
  if data_cfg.get("train"):
    raise DataError("data.train and data.domains are both set; the MoA suite reads one file per domain "
                    "(data.domains), a single LoRA reads data.train (configs/moa/expert.py)")
  for what, named in (("data.domains", files), ("data.val_domains", val_files)):
    for name, path in named.items():
      if os.fspath(path).endswith(_DATA_SUFFIXES) and not os.path.exists(path):
        raise DataError(f"{what}: the file of domain {name!r} does not exist: {path}")
  missing_val = [d for d in files if d not in val_files]
  if missing_val and not float(data_cfg.get("val_fraction") or 0):
    raise DataError(f"domain {missing_val[0]!r} has no validation records: give data.val_domains "
                    f"({missing_val[0]}=FILE) or data.val_fraction")
  return files, val_files


def load_domains(data_cfg, tokenizer) -> DomainData:
  """Reads and checks every domain file (and its val file) before anything trains."""
  files, val_files = domain_files(data_cfg)
  shared = {k: v for k, v in data_cfg.to_dict().items() if k not in ("domains", "val_domains", "task_args")}
  domains = tuple(sorted(files))
  train, val, identity, splits = {}, {}, {}, {}
  for d in domains:
    block = {**shared, "train": files[d], "val": val_files.get(d, ""), "test": "",
             "val_fraction": 0.0 if d in val_files else shared.get("val_fraction", 0.0)}
    splits[d] = load_dataset_config(block, tokenizer, int(data_cfg.max_len))
    identity[d] = data_identity(block)
  for d in domains:
    train[d] = [dataclasses.replace(e, domain=d) for e in splits[d].encoded["train"]]
    val[d] = [dataclasses.replace(r, domain=d) for r in splits[d].records["val"]]
  seq_len = max(s.seq_len for s in splits.values())
  return DomainData(domains, train, val, identity, seq_len, int(tokenizer.pad_id))


def routed_generate(base, spec, experts, route_fn, pad_id: int, domain: int):
  """`score_records`' generate_fn for experts routed by `route_fn` from each batch's prompts."""
  hooks, params = spec.hooks(), base.params()

  def gen(prompts, max_new_tokens, eos):
    tokens, valid = E.right_pad(prompts, pad_id)
    extra = {"lora": experts, "route": jnp.asarray(route_fn(tokens, valid, domain))}
    return generate(base, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos, params=params, hooks=hooks,
                    extra=extra, pad_batch=False)

  return gen


def router_accuracy(base, spec, experts, routers, prompts: dict[int, list[list[int]]], pad_id: int) -> dict:
  """Per layer: the fraction of prompts (by true domain id) whose router argmax is their domain."""
  hooks = R.MoAHooks(spec.targets, spec.scale, 0.0, 1)
  hits, total = None, 0
  for d, rows in prompts.items():
    tokens, valid = E.right_pad(rows, pad_id)
    _, probs = R.route(base.config, hooks, base.params(), experts, routers, jnp.asarray(tokens), jnp.asarray(valid))
    h = np.asarray(jnp.argmax(probs, -1) == d).sum(1)
    hits = h if hits is None else hits + h
    total += len(rows)
  return {str(layer): float(hits[layer] / total) for layer in range(len(hits))}


def run_on_files(config, workdir) -> dict:
  """The suite's steps on `config.base` (the embedded base when empty) and `config.data.domains`."""
  from moa.suite import train_classifier, train_moa

  t0 = time.time()
  workdir = Path(workdir)
  domain_files(config.data)
  if config.eval.metric not in ("exact", "number"):
    raise DataError(f"eval.metric={config.eval.metric!r}: the MoA suite scores generated answers (exact or number)")
  base_hf = model_dir(config.base) if config.base else base_hf_dir(config.base_workdir, config.pretrain,
                                                                   fallback=workdir / "base")
  tokenizer = load_tokenizer(base_hf)
  data = load_domains(config.data, tokenizer)
  ev = config.eval
  for d in data.domains:
    check_metric(data.val[d], ev.metric)
  domains, seed = list(data.domains), int(config.seed)
  everything = {"domains": {d: data.identity[d] for d in domains}}
  timings = {}

  t = time.time()
  paths = []
  for d in domains:
    tc = config.expert_train
    paths.append(train_lora(base_hf, None, config.lora, tc, None, workdir / "experts" / d,
                            batch_fn=data.batches([d], int(tc.batch_size), int(tc.seed)),
                            metadata={"domain": d}, data_identity=data.identity[d]))
    print(f"expert {d}: {paths[-1]}")
  timings["experts"] = time.time() - t
  t = time.time()
  st = ml_collections.ConfigDict(config.expert_train.to_dict())
  st.steps = int(config.expert_train.steps) * len(domains)
  single = train_lora(base_hf, None, config.lora, st, None, workdir / "single_lora",
                      batch_fn=data.batches(domains, int(st.batch_size), int(st.seed)),
                      metadata={"domains": domains}, data_identity=everything)
  timings["single_lora"] = time.time() - t

  base = hf.load(base_hf)
  experts, spec, _ = load_experts(paths, base.params())
  t = time.time()
  moa = train_moa(base_hf, spec, experts, None, domains, config.moa, config.moa.gamma, config.moa.train_experts,
                  workdir / "moa", tokenizer, None, seed,
                  batch_fn=data.batches(domains, int(config.moa.batch_size), seed), data_identity=everything)
  timings["moa"] = time.time() - t
  t = time.time()
  clf = train_classifier(base_hf, domains, config.classifier, workdir / "classifier", tokenizer, None, seed,
                         batch_fn=data.batches(domains, int(config.classifier.batch_size), seed))
  timings["classifier"] = time.time() - t

  t = time.time()
  m_experts, m_routers = moa.factors(), moa.routers()
  routes = E.label_free_routes(base, spec, m_experts, m_routers, clf)
  kw = dict(chat_template=config.data.chat_template, max_len=int(config.data.max_len),
            max_new_tokens=int(ev.max_new_tokens), batch_size=int(ev.batch_size))
  score = lambda model, d, **k: score_records(model, tokenizer, data.val[d], ev.metric, **kw, **k)[0]["accuracy"]
  per_domain = {mode: {d: score(base, d, generate_fn=routed_generate(base, spec, m_experts, fn, data.pad_id, i))
                       for i, d in enumerate(domains)} for mode, fn in routes.items()}
  s_lora, s_spec, _ = load_adapter(single, base.params(), cfg=base.config)
  merged = LoRAModel(base, s_spec, lora=s_lora).merged()
  per_domain["single_lora"] = {d: score(merged, d) for d in domains}
  base_acc = {d: score(base, d) for d in domains}
  prompts = {i: [encode_prompt(r, tokenizer, chat_template=config.data.chat_template,
                               max_len=int(config.data.max_len)) for r in data.val[d]] for i, d in enumerate(domains)}
  router_acc = router_accuracy(base, spec, m_experts, m_routers, prompts, data.pad_id)
  timings["evaluation"] = time.time() - t

  out = {"per_domain": {m: per_domain[m] for m in MODES}, "router_accuracy": router_acc, "base": base_acc,
         "domains": domains, "metric": ev.metric, "n_val": {d: len(data.val[d]) for d in domains},
         "base_model": str(base_hf), "files": named_files(config.data.domains, "data.domains"),
         "timings": timings, "seconds": time.time() - t0}
  if jax.process_index() == 0:
    write_results(workdir, out)
  rows = {"base": base_acc, **{m: per_domain[m] for m in MODES}}
  rows = {k: {**v, "overall": float(np.mean([v[d] for d in domains]))} for k, v in rows.items()}
  print_table(f"MoA on {base_hf}: {ev.metric} (%) on each domain's validation records", rows)
  print("\n### router accuracy per layer (validation prompts, no labels): "
        + ", ".join(f"layer {k}: {100 * v:.1f}%" for k, v in router_acc.items()))
  bar_chart(workdir / "results.png", rows, f"Mixture of LoRAs ({len(domains)} domain files): {ev.metric}")
  print(f"results: {workdir / 'results.json'}  chart: {workdir / 'results.png'}  ({out['seconds']:.0f} s)")
  return out
