"""Training objectives of an SVF expert.

REINFORCE (Transformer² eq. 2, as the official code computes it):
  loss = (1/B) Σ_b [ −A_b · Σ_t log π_θ(y_bt | x_b, y_b<t) + λ · KL_b ]
with A_b = r_b ∈ {+1, −1} from the task's verifier (or r_b − mean(r) with the baseline), and
KL_b = Σ_t KL(π_ref(·|…) ‖ π_θ(·|…)) over the full vocabulary at the generated positions: the
official code's `F.kl_div(logp_θ, logp_ref, log_target=True)` direction (the paper writes the
reverse). Rollouts come from the KV-cache decoder without gradient; the log-probs are
recomputed by a teacher-forced forward of prompt + rollout under the current z.

Next-token prediction is the alternative: `calm_jax.train.lm_batch_loss` on the SVF model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.decoding import generate_arrays, hf_positions
from calm_jax.models.decoder import forward


def reinforce_loss(logits, ref_logits, tokens, mask, rewards, *, kl_coef: float = 0.0, baseline: bool = False):
  """REINFORCE loss from the logits that predict each generated token.

  logits, ref_logits [B, N, V] (policy, reference; ref unused when kl_coef == 0), tokens [B, N],
  mask [B, N] (1 on generated tokens), rewards [B]. Returns (loss, metrics).
  """
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  seq_logp = jnp.sum(logp * mask, axis=-1)
  rewards = rewards.astype(jnp.float32)
  adv = rewards - jnp.mean(rewards) if baseline else rewards
  per_row = -adv * seq_logp
  kl = jnp.zeros_like(seq_logp)
  if kl_coef:
    ref = jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits).astype(jnp.float32), axis=-1)
    kl_t = jnp.sum(jnp.exp(ref) * (ref - logp_all), axis=-1)
    kl = jnp.sum(kl_t * mask, axis=-1)
    per_row = per_row + kl_coef * kl
  return jnp.mean(per_row), {"reward": jnp.mean(rewards), "kl": jnp.mean(kl), "seq_logp": jnp.mean(seq_logp)}


def rollout_logits(cfg, params, prompt, prompt_valid, gen, gen_mask):
  """Logits [B, N, V] that predict each generated token, by one teacher-forced forward of prompt + rollout."""
  p = prompt.shape[1]
  tokens = jnp.concatenate([prompt, gen], axis=1)
  valid = jnp.concatenate([prompt_valid, gen_mask.astype(bool)], axis=1)
  logits = forward(cfg, params, tokens, positions=hf_positions(valid), valid=valid)[0]
  return logits[:, p - 1:-1]


def make_verifier(tokenizer, example_of, registry=None):
  """Host reward function for `jax.pure_callback`: (tokens [B, N], lengths [B], index [B]) -> ±1 [B].

  example_of(i) gives the Example with stream index i; its task's own `verify` decides
  (`registry` holds re-configured tasks, else the suite's defaults).
  """
  from calm_jax.tasks import get_task
  registry = dict(registry or {})
  eos = tokenizer.eos_id

  def verify(tokens, lengths, index):
    out = np.empty(len(index), np.float32)
    for b, (row, n, i) in enumerate(zip(np.asarray(tokens), np.asarray(lengths), np.asarray(index))):
      ids = [int(t) for t in row[:int(n)]]
      if eos in ids:
        ids = ids[:ids.index(eos)]
      ex = example_of(int(i))
      task = registry.get(ex.task) or get_task(ex.task)
      out[b] = 1.0 if task.verify(tokenizer.decode(ids), ex.answer) else -1.0
    return out

  return verify


def reinforce_step_loss(model, batch, rng, *, verifier, max_new_tokens: int, temperature: float = 1.0,
                        kl_coef: float = 0.0, baseline: bool = False, eos_ids=None, pad_id=None,
                        adapted=lambda m: m.adapted_params()):
  """The trainer's loss_fn for REINFORCE: rollout (no gradient), reward (host verifier), policy-gradient loss.

  batch: prompt [B, P] left-padded, prompt_valid [B, P], index [B] (stream index of each example).
  adapted(model): the policy's weights as a decoder pytree, differentiable in the trainable
  parameters (SVF: W' from z; the LoRA baseline: W + s·AB).
  """
  cfg = model.config
  params = adapted(model)
  frozen_params = jax.lax.stop_gradient(params)
  gen, _, lengths = generate_arrays(cfg, frozen_params, batch["prompt"], batch["prompt_valid"], rng,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    eos_ids=eos_ids, pad_id=pad_id)
  gen_mask = jnp.arange(gen.shape[1])[None, :] < lengths[:, None]
  rewards = jax.pure_callback(verifier, jax.ShapeDtypeStruct(lengths.shape, jnp.float32), gen, lengths,
                              batch["index"])
  logits = rollout_logits(cfg, params, batch["prompt"], batch["prompt_valid"], gen, gen_mask)
  ref = None
  if kl_coef:
    ref = rollout_logits(cfg, jax.lax.stop_gradient(model.base.params()), batch["prompt"], batch["prompt_valid"],
                         gen, gen_mask)
  loss, metrics = reinforce_loss(logits, ref, gen, gen_mask, rewards, kl_coef=kl_coef, baseline=baseline)
  return loss, {**metrics, "accuracy": jnp.mean(rewards > 0)}
