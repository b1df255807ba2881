"""Defaults every SVF config shares: the base, the SVF targets / mask / init, the trainer."""
import ml_collections

from configs.common import add_common, data_files
from configs.pretrain import get_config as pretrain_config


def add_svf(c: ml_collections.ConfigDict, *, steps: int, batch_size: int) -> ml_collections.ConfigDict:
  add_common(c, steps=steps, batch_size=batch_size)
  c.base_workdir = "runs/demo/base"  # the base is BASE/hf, trained there with config.pretrain if missing
  c.pretrain = pretrain_config()
  # variants: named task variants {name: {"task": T, **args}} (svf.train.registry_for)
  c.data = ml_collections.ConfigDict(dict(tasks={}, seq_len=0, task_args=c.pretrain.data.task_args.to_dict(),
                                          variants={}))
  # Your own model and data: config.base (a model directory, a fetched name or a Hub id; "" = the embedded
  # tiny base) and the shared data keys (data.train / val / test, fields, chat_template, max_len).
  c.base = ""
  c.data.update(data_files())
  # the classification expert's data: {label: [tasks]} -> label of each templated prompt ({} = none)
  c.classifier = ml_collections.ConfigDict(dict(sources={}, template="cls:{prompt}="))
  # targets: "mlp" (official code), "attention", "both", or a regex over layers/{q,k,v,o,gate,up,down}.
  # f: "sigmoid" (official code) or "identity" (paper). z = init + noise·N(0, 1) (official: 0.1, 0.01).
  # svd_algorithm: "lapack" (gesdd, exact) or "gram" (eigh of WᵀW, ~2x faster, σ as accurate; svf/decompose.py).
  c.svf = ml_collections.ConfigDict(dict(targets="mlp", f="sigmoid", init=0.1, noise=0.01, svd_algorithm="lapack",
                                         cache_dir=""))  # "" -> BASE/svd_cache; $CALM_JAX_CACHE/svd for config.base
  c.rules = [("svd_rows", None), ("svd_cols", None), ("singular", None)]  # svf.model.SVF_RULES
  # Transformer² Table 6 / official code: Adam, lr 2e-3, no schedule, clip max-norm 1e-3.
  c.optimizer.update(name="adam", lr=2e-3, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1e-3)
  c.allow_transfer = False
  c.tensorboard = False
  c.reuse = True  # a finished expert (results.json + expert.safetensors) in the workdir is reused
  return c
