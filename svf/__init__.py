"""Transformer² (arXiv 2501.06252): singular-value fine-tuning (SVF) experts and two-pass
self-adaptation on the shared decoder.

  decompose.py  full-rank fp32 SVD of the target matrices (vmapped over stacked layers), disk cache
  model.py      SVF parametrisation W' = U diag(σ⊙m) Vᵀ (Σσ/Σσ⊙m), m = f(z); the SVFModel holder
  expert.py     z-vectors as tiny safetensors files with their base's fingerprint
  objectives.py REINFORCE (±1 verifier reward, optional KL and baseline) and next-token losses
  train.py      the "svf_expert" method: one expert per task with the shared trainer
  dispatch.py   first pass: classification prompt -> label -> expert (prompt / classification expert)
  cem.py        cross-entropy method over mixing coefficients (population evaluated in one vmap)
  adapt.py      the "svf_adapt" method: prompt dispatch, classification expert, few-shot CEM
  on_files.py   an expert of any model on dataset files (config.base + config.data): metric = reward
  adapt_files.py  adaptation on test records: the real classification prompt, a classifier, CEM
  suite.py      the "svf_suite" experiment
"""
