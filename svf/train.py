"""The "svf_expert" method: train one SVF expert (z vectors) on one task with the shared trainer.

  python -m launch.train --config=configs/svf/expert.py:task=addition --workdir=DIR
  python -m launch.train --config=configs/svf/expert.py:task=addition,adapter=lora --workdir=DIR

`adapter=lora` trains the comparison baseline instead: the core LoRA (calm_jax.lora) on the same
matrices, with the same trainer, objective and data; rank "auto" is the smallest rank whose
parameter count is >= the SVF expert's. It is saved as DIR/adapter (calm_jax.lora.save_adapter).

Only `SVFParam` trains (the base and its SVD factors are frozen). Objectives: "reinforce"
(rollouts from the KV-cache decoder, ±1 reward from the task verifier) or "ntp". Every
`eval_every` steps the validation accuracy is measured and the best z is kept as
DIR/expert.safetensors (with the base fingerprint, targets and f). Writes DIR/results.json
({"val_accuracy", "test_accuracy", "best_step", "params", "seconds"}).
With `config.data.train` set, svf/on_files.py trains on dataset files of one's own instead.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from calm_jax import hf, sharding
from calm_jax.experiment import suite_accuracy, write_results
from calm_jax.fingerprint import fingerprint
from calm_jax.pretrain import base_hf_dir
from calm_jax.registry import register_method
from calm_jax.tasks import Mixture, max_seq_len, task_registry
from calm_jax.tokenizers import load_tokenizer
from calm_jax.train import lm_batch_loss, train
from calm_jax.train.workdir import check_finished
from calm_jax.variables import LoRAParam, SVFParam
from svf.decompose import cached_decompose, target_regex
from svf.dispatch import Classify
from svf.expert import load_expert, save_expert
from svf.model import SVFModel, num_params
from svf.objectives import make_verifier, reinforce_step_loss

EXPERT_NAME = "expert.safetensors"


def base_dir(config) -> Path:
  """The base's HF directory (config.base_workdir/hf), trained with config.pretrain if missing."""
  return base_hf_dir(config.base_workdir, config.pretrain)


def registry_for(config) -> dict:
  """Configured suite tasks, named variants (config.data.variants: {name: {"task": T, **args}}, e.g. a
  3-digit "addition_3d" the base never saw, or {"task": "interleaved", "of": [T, ...]}: prompts of the
  configured tasks T mixed, each keeping its own split) and the classification task when the config
  defines one."""
  import copy

  from calm_jax.tasks import Interleaved, get_task
  reg = task_registry(config.data.task_args)
  for name, spec in dict(config.data.variants).items():
    spec = dict(spec)
    kind = spec.pop("task")
    if kind == "interleaved":
      reg[name] = Interleaved(name, [reg.get(t) or get_task(t) for t in spec.pop("of")], **spec)
      continue
    task = copy.copy(get_task(kind, **spec))  # without arguments get_task returns the shared default
    task.name = name  # its own name: its own splits and results column
    reg[name] = task
  if config.classifier.sources:  # sees the whole prompt
    reg[Classify.name] = Classify(dict(config.classifier.sources), config.classifier.template, registry=reg)
  return reg


def load_svf_model(config, base_hf: Path, mesh=None) -> SVFModel:
  """The base at `base_hf` with SVD factors of config.svf.targets and fresh z. The factors are cached (by the
  base's fingerprint) beside the embedded base, and for a model of one's own (config.base) in the user cache
  ($CALM_JAX_CACHE/svd), never in or beside the user's model directory."""
  from calm_jax.fetch import default_cache
  base = hf.load(base_hf)
  cache = config.svf.cache_dir or str(default_cache() / "svd" if config.get("base") else
                                      Path(base_hf).parent / "svd_cache")
  factors = cached_decompose(base.params(), config.svf.targets, cache, mesh=mesh,
                             algorithm=config.svf.svd_algorithm)
  return SVFModel(base, factors, f=config.svf.f, init=config.svf.init, noise=config.svf.noise,
                  seed=int(config.seed))


def z_shapes(model: SVFModel) -> dict:
  return {n: tuple(z.shape) for n, z in model.zs().items()}


def attach_expert(model: SVFModel, path, allow_transfer: bool = False) -> dict:
  """The z vectors of an expert file checked against `model` (base fingerprint, targets, f)."""
  return load_expert(path, base_fingerprint=fingerprint(model.base.params()), shapes=z_shapes(model), f=model.f,
                     allow_transfer=allow_transfer)


def prompt_batches(config, tokenizer, registry):
  """REINFORCE batches: left-padded bos+prompt ids and each example's stream index (for the verifier)."""
  mixture = Mixture({config.task: 1.0}, seed=int(config.seed), registry=registry)
  task = mixture.tasks[config.task]
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  p = len(bos) + task.max_prompt_chars
  b = int(config.batch_size)

  def batch_fn(step):
    prompt = np.full((b, p), tokenizer.pad_id, np.int32)
    valid = np.zeros((b, p), bool)
    for i, ex in enumerate(mixture.examples(step * b, b)):
      ids = bos + tokenizer.encode(ex.prompt)
      prompt[i, p - len(ids):], valid[i, p - len(ids):] = ids, True
    return {"prompt": prompt, "prompt_valid": valid, "index": np.arange(step * b, (step + 1) * b, dtype=np.int32)}

  return mixture, task, batch_fn


def lora_baseline(config, svf_model: SVFModel):
  """The core LoRA on the SVF targets, rank >= enough to match the SVF expert's parameter count."""
  from calm_jax.lora import LoRAModel, LoRASpec, count_params, init_lora
  cfg = svf_model.config
  targets = target_regex(config.svf.targets)
  rank = config.lora.rank
  if str(rank) in ("auto", "0"):
    need, rank = num_params(svf_model.zs()), 1
    while count_params(init_lora(cfg, LoRASpec.create(cfg, targets, rank))) < need:
      rank += 1
  spec = LoRASpec.create(cfg, targets, int(rank), alpha=float(config.lora.alpha or rank))
  return LoRAModel(svf_model.base, spec, seed=int(config.seed))


def lora_params(m):
  from calm_jax.lora import merge_lora
  return merge_lora(m.config, m.base.params(), m.factors(), m.spec.scale)


@register_method("svf_expert")
def run(config, workdir) -> dict:
  if config.data.get("train"):  # a model and dataset files of one's own
    from svf.on_files import run_on_files
    return run_on_files(config, workdir)
  t0 = time.time()
  workdir = Path(workdir)
  lora = config.adapter == "lora"
  expert_path = workdir / ("adapter" if lora else EXPERT_NAME)
  if config.reuse and expert_path.exists() and (workdir / "results.json").exists():
    check_finished(workdir, config, "expert")
    return json.loads((workdir / "results.json").read_text())
  base_hf = base_dir(config)
  tokenizer = load_tokenizer(base_hf)
  registry = registry_for(config)
  # the SVD and the training step share the config's mesh
  mesh = sharding.make_mesh(config.mesh, batch_size=int(config.batch_size))
  model = load_svf_model(config, base_hf, mesh)
  base_fp = fingerprint(model.base.params())
  adapted, trainable = (lambda m: m.adapted_params()), SVFParam
  if lora:
    model, adapted, trainable = lora_baseline(config, model), lora_params, LoRAParam

  if config.objective == "reinforce":
    mixture, task, batch_fn = prompt_batches(config, tokenizer, registry)
    rl = config.rl
    loss_fn = functools.partial(
        reinforce_step_loss, verifier=make_verifier(tokenizer, mixture.example, registry),
        max_new_tokens=int(rl.max_new_tokens) or task.max_answer_chars + 1, temperature=float(rl.temperature),
        kl_coef=float(rl.kl_coef), baseline=bool(rl.baseline), eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
        adapted=adapted)
  elif config.objective == "ntp":
    mixture = Mixture({config.task: 1.0}, seed=int(config.seed), registry=registry)
    seq_len = int(config.data.seq_len) or max_seq_len([mixture.tasks[config.task]])
    batch_fn = lambda step: mixture.batch(step, int(config.batch_size), tokenizer, seq_len)  # noqa: E731
    loss_fn = lm_batch_loss
  else:
    raise ValueError(f"unknown SVF objective {config.objective!r}: reinforce or ntp")

  ev = config.eval
  best = {"val_accuracy": -1.0, "step": 0}

  def accuracy(m, split, n):
    acc = suite_accuracy(m.base, tokenizer, [config.task], n_per_task=n, split=split, batch_size=ev.batch_size,
                         registry=registry, generate_kwargs={"params": adapted(m)})
    return acc[config.task]

  def keep_if_best(m, step):
    val = accuracy(m, "val", ev.n_val)
    if val > best["val_accuracy"]:
      best.update(val_accuracy=val, step=step, state=jax.device_get(m.factors() if lora else m.zs()))
      meta = {"step": step, "val_accuracy": val}
      if lora:
        from calm_jax.lora import save_adapter
        save_adapter(expert_path, best["state"], m.spec, m.base.params(), metadata={"task": config.task, **meta},
                     overwrite=True)
      else:
        save_expert(expert_path, best["state"], base_fingerprint=base_fp, targets=target_regex(config.svf.targets),
                    f=config.svf.f, task=config.task, extra=meta)
    return {"val_accuracy": val}

  keep_if_best(model, 0)  # the start (z = init, W' ≈ W) is a candidate too
  result = train(model, trainable=trainable, loss_fn=loss_fn, batch_fn=batch_fn, config=config, workdir=workdir,
                 eval_fn=keep_if_best, mesh=mesh,
                 meta={"base": base_fp, "targets": target_regex(config.svf.targets), "task": config.task},
                 quiet=config.quiet)
  if not int(config.eval_every):
    keep_if_best(result.model, result.step)
  model = result.model
  if lora:
    from calm_jax.lora import LoRAModel, load_adapter
    factors, spec, _ = load_adapter(expert_path, model.base.params(), cfg=model.config)
    model = LoRAModel(model.base, spec, lora=factors)
  else:
    model.set_zs(attach_expert(model, expert_path))
  out = {"task": config.task, "adapter": "lora" if lora else "svf", "val_accuracy": best["val_accuracy"],
         "best_step": best["step"], "test_accuracy": accuracy(model, ev.split, ev.n_test),
         "params": num_params(model.factors() if lora else model.zs()),
         "steps": result.step, "seconds": time.time() - t0, "expert": str(expert_path),
         "final_metrics": result.metrics}
  write_results(workdir, out)
  print(f"{out['adapter']} expert for {config.task}: val {best['val_accuracy']:.3f} (step {best['step']}), "
        f"test {out['test_accuracy']:.3f}, {out['params']} params -> {expert_path}")
  return out
