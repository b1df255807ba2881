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
