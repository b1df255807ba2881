"""The MoA experiment ("moa_suite"): per-domain LoRA experts of the tiny base, routers trained
with domain labels, inference without labels, against the baselines.

  python -m launch.train --config=configs/moa/suite.py --workdir=DIR [--config.base_workdir=BASE]

Steps (each reused when its output exists in DIR):
  1. one LoRA per domain on that domain's data -> DIR/experts/NAME/adapter (the "moa_expert" code);
  2. the single-LoRA baseline: one LoRA on the mixed data, same rank, as many examples per
     domain as an expert saw -> DIR/single_lora/adapter;
  3. MoA: experts stacked from step 1, routers trained with LM + γ·CE on mixed batches (each
     example on its labelled expert), experts frozen or trainable -> DIR/moa/state;
     ablation (config.scratch): experts from B = 0 trained jointly instead -> DIR/moa_scratch/state;
  4. the separate-classifier baseline: a linear domain classifier on the base -> DIR/classifier;
  5. optional (config.new_domain): a new domain's LoRA appended as expert X and the routers
     extended and retrained (experts untouched) -> DIR/extended;
  6. accuracy (greedy, exact match) and answer perplexity per domain for every mode; router
     accuracy per layer on held-out labelled prompts.
Writes DIR/results.json {"per_domain": {mode: {domain: acc}}, "router_accuracy": {layer: acc}, ...}
(modes moa_layer, moa_vote, moa_last, single_lora, oracle, classifier; perplexity, base and
ablations under their own keys), DIR/results.png, and prints the tables.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from calm_jax import hf
from calm_jax.experiment import bar_chart, print_table, write_results
from calm_jax.lora import ADAPTER_CONFIG, LoRAModel, init_lora, load_adapter
from calm_jax.pretrain import base_hf_dir
from calm_jax.registry import register_method
from calm_jax.tasks import Mixture, max_seq_len, task_registry
from calm_jax.tokenizers import load_tokenizer
from calm_jax.train import train
from calm_jax.train.workdir import RunMismatchError, check_finished, differences
from calm_jax.variables import LoRAParam, RouterParam
from moa import evaluate as E
from moa.classifier import DomainClassifier, classifier_loss
from moa.experts import add_expert, load_experts, stack_loras
from moa.lora_training import train_lora
from moa.model import MoAModel, load_moa, moa_loss, save_moa
from moa.routers import extend_routers

MODES = ("moa_layer", "moa_vote", "moa_last", "single_lora", "oracle", "classifier")


def labelled_batches(domains, config, tokenizer, registry, batch_size):
  """batch_fn(step) over an equal mixture of `domains`, domain ids = index in `domains` (checked)."""
  mixture = Mixture({d: 1.0 for d in domains}, seed=int(config.seed), domains=list(domains), registry=registry)
  seq_len = max_seq_len(list(mixture.tasks.values()))

  def batch_fn(step):
    b = mixture.batch(step, batch_size, tokenizer, seq_len)
    if b["domain"].min() < 0 or b["domain"].max() >= len(domains):
      raise ValueError(f"domain label out of range [0, {len(domains)}) in batch {step}")
    return b

  return batch_fn


def train_moa(base_hf, spec, experts, routers, domains, tc, gamma, train_experts, workdir, tokenizer, registry,
              seed, *, batch_fn=None, data_identity: dict | None = None) -> MoAModel:
  """Stage 2 (reused if DIR/state exists, for the same config and data): routers (+ experts if asked) on mixed
  labelled batches (`batch_fn`, default the suite's domains in equal parts)."""
  out = Path(workdir) / "state"
  base = hf.load(base_hf)
  c = ml_collections.ConfigDict(tc.to_dict())
  c.seed = seed
  if (out / "routers.safetensors").exists():
    check_finished(workdir, c, "MoA stage")
    recorded = json.loads((out / "experts" / ADAPTER_CONFIG).read_text()).get("data_identity", {})
    diff = differences(recorded, data_identity or {})
    if diff:
      raise RunMismatchError(f"{workdir} holds a MoA stage trained on other data ({'; '.join(diff[:6])}); use a "
                             "fresh workdir, or delete it to retrain")
    return load_moa(out, base)
  model = MoAModel(base, spec, experts, routers, seed=seed)
  trainable, frozen = ((RouterParam, LoRAParam), ()) if train_experts else (RouterParam, LoRAParam)
  result = train(model, trainable=trainable, frozen=frozen, loss_fn=moa_loss(float(gamma)),
                 batch_fn=batch_fn or labelled_batches(domains, c, tokenizer, registry, int(c.batch_size)),
                 config=c, workdir=workdir, quiet=True)
  save_moa(out, result.model, metadata={"domains": list(domains), "data_identity": data_identity or {}},
           overwrite=True)
  return result.model


def train_classifier(base_hf, domains, tc, workdir, tokenizer, registry, seed, *, batch_fn=None) -> DomainClassifier:
  c = ml_collections.ConfigDict(tc.to_dict())
  c.seed = seed
  model = DomainClassifier(hf.load(base_hf), len(domains), seed)
  result = train(model, trainable=RouterParam, loss_fn=classifier_loss,
                 batch_fn=batch_fn or labelled_batches(domains, c, tokenizer, registry, int(c.batch_size)),
                 config=c, workdir=workdir, quiet=True)
  return result.model


def score(base, spec, experts, route_fn, tokenizer, domains, ev, registry, eval_domains=None):
  kw = dict(n_per_task=ev.n_per_task, split=ev.split, registry=registry, eval_domains=eval_domains)
  acc = E.routed_accuracy(base, spec, experts, route_fn, tokenizer, domains, batch_size=ev.batch_size, **kw)
  ppl = E.routed_perplexity(base, spec, experts, route_fn, tokenizer, domains, **kw)
  return acc, ppl


@register_method("moa_suite")
def run(config, workdir) -> dict:
  if config.data.get("domains"):
    from moa.user_data import run_on_files
    return run_on_files(config, workdir)
  t0 = time.time()
  workdir = Path(workdir)
  base_hf = base_hf_dir(config.base_workdir, config.pretrain, fallback=workdir / "base")
  tokenizer = load_tokenizer(base_hf)
  registry = task_registry(config.data.task_args)
  domains = list(config.domains)
  seed = int(config.seed)
  ev = config.eval
  timings = {}

  # 1-2. domain experts and the single mixed-data LoRA.
  t = time.time()
  paths = []
  for d in domains:
    paths.append(train_lora(base_hf, {d: 1.0}, config.lora, config.expert_train, config.data.task_args,
                            workdir / "experts" / d, metadata={"domain": d}))
    print(f"expert {d}: {paths[-1]}")
  timings["experts"] = time.time() - t
  t = time.time()
  st = ml_collections.ConfigDict(config.expert_train.to_dict())
  st.steps = int(config.expert_train.steps) * len(domains)
  single = train_lora(base_hf, {d: 1.0 for d in domains}, config.lora, st, config.data.task_args,
                      workdir / "single_lora", metadata={"domains": domains})
  timings["single_lora"] = time.time() - t

  base = hf.load(base_hf)
  experts, spec, _ = load_experts(paths, base.params())

  # 3. MoA stage 2, and the from-scratch ablation.
  t = time.time()
  moa = train_moa(base_hf, spec, experts, None, domains, config.moa, config.moa.gamma, config.moa.train_experts,
                  workdir / "moa", tokenizer, registry, seed)
  timings["moa"] = time.time() - t
  # 4. separate classifier.
  t = time.time()
  clf = train_classifier(base_hf, domains, config.classifier, workdir / "classifier", tokenizer, registry, seed)
  timings["classifier"] = time.time() - t

  # 6. scores.
  t = time.time()
  m_experts, m_routers = moa.factors(), moa.routers()
  routes = E.label_free_routes(base, spec, m_experts, m_routers, clf)
  per_domain, perplexity = {}, {}
  for mode, fn in routes.items():
    per_domain[mode], perplexity[mode] = score(base, spec, m_experts, fn, tokenizer, domains, ev, registry)
  s_lora, s_spec, _ = load_adapter(single, base.params(), cfg=base.config)
  merged = LoRAModel(base, s_spec, lora=s_lora).merged()
  kw = dict(n_per_task=ev.n_per_task, split=ev.split, registry=registry)
  per_domain["single_lora"] = E.plain_accuracy(merged, tokenizer, domains, batch_size=ev.batch_size, **kw)
  perplexity["single_lora"] = E.routed_perplexity(merged, None, None, None, tokenizer, domains, **kw)
  base_acc = E.plain_accuracy(base, tokenizer, domains, batch_size=ev.batch_size, **kw)
  base_ppl = E.routed_perplexity(base, None, None, None, tokenizer, domains, **kw)
  router_acc = E.router_accuracy(base, spec, m_experts, m_routers, tokenizer, domains, **kw)
  ablations = {}
  k = int(config.inference.top_k)
  if k > 1:
    for mode in ("layer", "vote", "last"):
      fn = E.moa_route(base, spec, m_experts, m_routers, mode, top_k=k)
      ablations[f"moa_{mode}_top{k}"], perplexity[f"moa_{mode}_top{k}"] = score(base, spec, m_experts, fn,
                                                                                  tokenizer, domains, ev, registry)
  timings["evaluation"] = time.time() - t

  if config.scratch:
    t = time.time()
    zero = stack_loras([init_lora(base.config, spec.with_experts(None), seed + 1 + i) for i in range(len(domains))],
                       [spec.with_experts(None)] * len(domains))[0]
    sc = ml_collections.ConfigDict(config.moa.to_dict())
    sc.steps = int(config.scratch_steps)
    scratch = train_moa(base_hf, spec, zero, None, domains, sc, config.moa.gamma, True, workdir / "moa_scratch",
                        tokenizer, registry, seed)
    fn = E.moa_route(base, spec, scratch.factors(), scratch.routers(), "layer")
    ablations["moa_layer (experts from scratch)"], perplexity["moa_layer (experts from scratch)"] = score(
        base, spec, scratch.factors(), fn, tokenizer, domains, ev, registry)
    timings["scratch"] = time.time() - t

  extended = None
  if config.new_domain:
    t = time.time()
    extended = extend(config, base_hf, base, spec, moa, domains, tokenizer, registry, workdir, seed)
    timings["new_domain"] = time.time() - t

  out = {"per_domain": {m: per_domain[m] for m in MODES}, "router_accuracy": router_acc,
         "perplexity": perplexity, "base": base_acc, "base_perplexity": base_ppl, "ablations": ablations,
         "new_domain": extended, "domains": domains, "timings": timings, "seconds": time.time() - t0,
         "router_accuracy_min": float(config.eval.router_min_accuracy)}
  if jax.process_index() == 0:
    write_results(workdir, out)
  rows = {"base": base_acc, **{m: per_domain[m] for m in MODES}, **ablations}
  rows = {k: {**v, "overall": float(np.mean([v[d] for d in domains]))} for k, v in rows.items()}  # domain mean
  print_table("MoA on the tiny base: test accuracy (%) per domain", rows)
  ppl_rows = {"base": base_ppl, **perplexity}
  print("\n### answer perplexity per domain\n\n| | " + " | ".join(domains) + " |\n" + "|---" * (len(domains) + 1)
        + "|\n" + "\n".join(f"| {k} | " + " | ".join(f"{v[d]:.3f}" for d in domains) + " |"
                            for k, v in ppl_rows.items()))
  print("\n### router accuracy per layer (held-out labelled prompts): "
        + ", ".join(f"layer {k}: {100 * v:.1f}%" for k, v in router_acc.items()))
  if extended:
    print_table(f"after adding {config.new_domain} as a new expert: test accuracy (%)", extended["per_domain"])
  bar_chart(workdir / "results.png", {"base": base_acc, **{m: per_domain[m] for m in MODES}},
            f"Mixture of LoRAs on the tiny base ({len(domains)} domains): test exact match")
  print(f"results: {workdir / 'results.json'}  chart: {workdir / 'results.png'}  ({out['seconds']:.0f} s)")
  return out


def extend(config, base_hf, base, spec, moa, domains, tokenizer, registry, workdir, seed) -> dict:
  """Adds config.new_domain as expert X: trains its LoRA alone, appends it, extends the routers
  by one column and retrains only the routers (the existing experts are copied unchanged)."""
  new = config.new_domain
  path = train_lora(base_hf, {new: 1.0}, config.lora, config.expert_train, config.data.task_args,
                    workdir / "experts" / new, metadata={"domain": new})
  lora, lspec, _ = load_adapter(path, base.params(), cfg=base.config)
  experts, spec2 = add_expert(moa.factors(), spec, lora, lspec, name=str(path))
  all_domains = domains + [new]
  grown = train_moa(base_hf, spec2, experts, extend_routers(moa.routers(), seed), all_domains, config.moa,
                    config.moa.gamma, False, workdir / "extended", tokenizer, registry, seed)
  unchanged = all(np.array_equal(np.asarray(a[:, :len(domains)]), np.asarray(b)) for a, b in
                  zip(jax.tree.leaves(grown.factors()), jax.tree.leaves(moa.factors())))
  fn = E.moa_route(base, spec2, grown.factors(), grown.routers(), "layer")
  acc, ppl = score(base, spec2, grown.factors(), fn, tokenizer, all_domains, config.eval, registry)
  kw = dict(n_per_task=config.eval.n_per_task, split=config.eval.split, registry=registry)
  racc = E.router_accuracy(base, spec2, grown.factors(), grown.routers(), tokenizer, all_domains, **kw)
  return {"domain": new, "per_domain": {"moa_layer": acc}, "perplexity": {"moa_layer": ppl},
          "router_accuracy": racc, "existing_experts_unchanged": bool(unchanged)}
