"""Training one LoRA on a task mixture (a domain expert, or the single-LoRA baseline), and the
"moa_expert" method: `python -m launch.train --config=configs/moa/expert.py:domain=count --workdir=DIR`, or on
a model and dataset files of one's own: `--config.base=DIR_OR_HUB_ID --config.data.train=F --config.data.val=G`.

The adapter is trained with the shared trainer (`trainable=LoRAParam`: the base gets no
gradient and no optimizer state) and saved on its own in DIR/adapter (safetensors + JSON with
the base's fingerprint), where `moa.experts.load_experts` stacks it with the other domains'.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from calm_jax import hf
from calm_jax.experiment import print_table, suite_accuracy, write_results
from calm_jax.lora import ADAPTER_CONFIG, LoRAModel, LoRASpec, load_adapter, save_adapter
from calm_jax.pretrain import base_hf_dir
from calm_jax.registry import register_method
from calm_jax.tasks import mixture_batches, task_registry
from calm_jax.tokenizers import load_tokenizer
from calm_jax.train import lm_loss, train
from calm_jax.train.workdir import RunMismatchError, check_finished, differences
from calm_jax.variables import LoRAParam


def lora_lm_loss(model: LoRAModel, batch, rng):
  """Next-token loss on answer tokens (LoRA dropout draws from rng)."""
  logits = model(batch["inputs"], batch["attention_mask"], rng=rng)
  return lm_loss(logits, batch["targets"], batch["loss_mask"])


def train_lora(base_hf, tasks: dict[str, float] | None, lora_cfg, train_cfg, task_args, workdir, *,
               metadata: dict | None = None, quiet: bool = True, batch_fn=None, data_identity: dict | None = None
               ) -> Path:
  """Trains a LoRA of the base on `tasks` ({name: weight}) or on `batch_fn(step)` (users' data, whose
  `data_identity` the adapter records); returns WORKDIR/adapter, reused only for the same config and data."""
  workdir = Path(workdir)
  out = workdir / "adapter"
  if (out / ADAPTER_CONFIG).exists():
    check_finished(workdir, train_cfg, "LoRA")
    recorded = json.loads((out / ADAPTER_CONFIG).read_text()).get("data_identity", {})
    diff = differences(recorded, data_identity or {})
    if diff:
      raise RunMismatchError(f"{workdir} holds a LoRA trained on other data ({'; '.join(diff[:6])}); use a fresh "
                             "workdir, or delete it to retrain")
    return out
  tokenizer = load_tokenizer(base_hf)
  base = hf.load(base_hf)
  spec = LoRASpec.from_config(base.config, lora_cfg)
  model = LoRAModel(base, spec, seed=int(train_cfg.seed))
  if batch_fn is None:
    _, _, batch_fn = mixture_batches(tasks, batch_size=train_cfg.batch_size, tokenizer=tokenizer,
                                     seed=int(train_cfg.seed), registry=task_registry(task_args))
  result = train(model, trainable=LoRAParam, loss_fn=lora_lm_loss, batch_fn=batch_fn, config=train_cfg,
                 workdir=workdir, quiet=quiet)
  save_adapter(out, result.model.factors(), spec, base.params(), overwrite=True,
               metadata={"tasks": dict(tasks or {}), "steps": int(train_cfg.steps),
                         "final_loss": result.metrics.get("loss"), "data_identity": data_identity or {},
                         **(metadata or {})})
  return out


@register_method("moa_expert")
def run(config, workdir) -> dict:
  """One domain expert: train, save the adapter, score base vs base+adapter on the domain."""
  if config.data.train:
    return run_on_files(config, workdir)
  t0 = time.time()
  workdir = Path(workdir)
  base_hf = base_hf_dir(config.base_workdir, config.pretrain, fallback=workdir / "base")
  adapter = train_lora(base_hf, {config.domain: 1.0}, config.lora, config.train, config.data.task_args, workdir,
                       metadata={"domain": config.domain}, quiet=False)
  tokenizer = load_tokenizer(base_hf)
  base = hf.load(base_hf)
  lora, spec, meta = load_adapter(adapter, base.params(), cfg=base.config)
  registry = task_registry(config.data.task_args)
  ev = config.eval
  score = lambda m: suite_accuracy(m, tokenizer, [config.domain], n_per_task=ev.n_per_task, split=ev.split,
                                   batch_size=ev.batch_size, registry=registry)[config.domain]
  adapted = LoRAModel(base, spec, lora=lora).merged()  # merged weights: exact, and the fastest decode
  out = {"domain": config.domain, "base_accuracy": score(base), "accuracy": score(adapted),
         "adapter": str(adapter), "seconds": time.time() - t0, "final_loss": meta.get("final_loss")}
  if jax.process_index() == 0:
    write_results(workdir, out)
  print_table(f"LoRA expert for {config.domain}: test accuracy (%)",
              {"base": {config.domain: out["base_accuracy"]}, "base + LoRA": {config.domain: out["accuracy"]}})
  print(f"adapter: {adapter}  results: {workdir / 'results.json'}")
  return out


def run_on_files(config, workdir) -> dict:
  """A LoRA of `config.base` (the embedded base when empty) trained on `config.data.train` and scored, base vs
  base + LoRA, on the validation records with `config.eval.metric`. Every record is read and checked first."""
  from calm_jax.data import data_identity, load_dataset_config
  from calm_jax.evaluate import check_metric, score_records
  from calm_jax.hub import model_dir

  t0 = time.time()
  workdir = Path(workdir)
  base_hf = model_dir(config.base) if config.base else base_hf_dir(config.base_workdir, config.pretrain,
                                                                   fallback=workdir / "base")
  tokenizer = load_tokenizer(base_hf)
  data = load_dataset_config(config.data, tokenizer, int(config.data.max_len))
  split = "val" if "val" in data.records else "train"
  check_metric(data.records[split], config.eval.metric)
  batch_fn = data.batches("train", int(config.train.batch_size), seed=int(config.train.seed))
  adapter = train_lora(base_hf, None, config.lora, config.train, None, workdir, quiet=False, batch_fn=batch_fn,
                       metadata={"data": str(config.data.train)}, data_identity=data_identity(config.data))
  base = hf.load(base_hf)
  lora, spec, meta = load_adapter(adapter, base.params(), cfg=base.config)
  ev = config.eval
  score = lambda m: score_records(m, tokenizer, data.records[split], ev.metric, chat_template=config.data.chat_template,
                                  max_len=int(config.data.max_len), max_new_tokens=int(ev.max_new_tokens),
                                  batch_size=int(ev.batch_size))[0]
  key = "ppl" if ev.metric == "ppl" else "accuracy"
  before, after = score(base), score(LoRAModel(base, spec, lora=lora).merged())
  out = {"base": str(base_hf), "data": str(config.data.train), "split": split, "metric": ev.metric,
         f"base_{key}": before[key], key: after[key], "n": after["n"], "adapter": str(adapter),
         "seconds": time.time() - t0, "final_loss": meta.get("final_loss")}
  if jax.process_index() == 0:
    write_results(workdir, out)
  print(f"{ev.metric} on the {split} records ({after['n']}): base {before[key]:.4g}, base + LoRA {after[key]:.4g}")
  print(f"adapter: {adapter}  results: {workdir / 'results.json'}")
  return out
