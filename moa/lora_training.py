"""Training one LoRA on a task mixture (a domain expert, or the single-LoRA baseline), and the
"moa_expert" method: `python -m launch.train --config=configs/moa/expert.py:domain=count --workdir=DIR`.

The adapter is trained with the shared trainer (`trainable=LoRAParam`: the base gets no
gradient and no optimizer state) and saved on its own in DIR/adapter (safetensors + JSON with
the base's fingerprint), where `moa.experts.load_experts` stacks it with the other domains'.
"""
from __future__ import annotations

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
from calm_jax.train.workdir import check_finished
from calm_jax.variables import LoRAParam


def lora_lm_loss(model: LoRAModel, batch, rng):
  """Next-token loss on answer tokens (LoRA dropout draws from rng)."""
  logits = model(batch["inputs"], batch["attention_mask"], rng=rng)
  return lm_loss(logits, batch["targets"], batch["loss_mask"])


def train_lora(base_hf, tasks: dict[str, float], lora_cfg, train_cfg, task_args, workdir, *,
               metadata: dict | None = None, quiet: bool = True) -> Path:
  """Trains a LoRA of the base on `tasks` ({name: weight}); returns WORKDIR/adapter (reused if present)."""
  workdir = Path(workdir)
  out = workdir / "adapter"
  if (out / ADAPTER_CONFIG).exists():
    check_finished(workdir, train_cfg, "LoRA")
    return out
  tokenizer = load_tokenizer(base_hf)
  base = hf.load(base_hf)
  spec = LoRASpec.from_config(base.config, lora_cfg)
  model = LoRAModel(base, spec, seed=int(train_cfg.seed))
  _, _, batch_fn = mixture_batches(tasks, batch_size=train_cfg.batch_size, tokenizer=tokenizer,
                                   seed=int(train_cfg.seed), registry=task_registry(task_args))
  result = train(model, trainable=LoRAParam, loss_fn=lora_lm_loss, batch_fn=batch_fn, config=train_cfg,
                 workdir=workdir, quiet=quiet)
  save_adapter(out, result.model.factors(), spec, base.params(), overwrite=True,
               metadata={"tasks": dict(tasks), "steps": int(train_cfg.steps),
                         "final_loss": result.metrics.get("loss"), **(metadata or {})})
  return out


@register_method("moa_expert")
def run(config, workdir) -> dict:
  """One domain expert: train, save the adapter, score base vs base+adapter on the domain."""
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
