"""Losses shared by the methods."""
import jax
import jax.numpy as jnp


def lm_loss(logits, targets, loss_mask):
  """Mean next-token cross-entropy over masked (answer) positions, and token accuracy."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == targets) * mask).sum() / denom
  return (nll * mask).sum() / denom, {"token_accuracy": acc}


def lm_batch_loss(model, batch, rng):
  """`lm_loss` of a model called on a right-padded batch (`tasks.encode_batch`'s arrays)."""
  logits = model(batch["inputs"], batch["attention_mask"])
  return lm_loss(logits, batch["targets"], batch["loss_mask"])
