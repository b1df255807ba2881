"""The "separate classifier + LoRAs" baseline: a linear domain classifier on the frozen base's
last hidden state (pooled over the prompt like a router), trained apart from the LoRAs; its
argmax picks the LoRA for the whole sequence."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm_jax.models.decoder import Decoder, forward
from calm_jax.variables import RouterParam
from moa.model import prompt_mask
from moa.routers import layer_logits


class DomainClassifier(nnx.Module):
  def __init__(self, base: Decoder, num_domains: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    E = base.config.hidden_size
    self.base = base
    self.w = RouterParam(jnp.asarray(0.1 / np.sqrt(E) * rng.standard_normal((E, num_domains)), jnp.float32),
                         axes=("embed", "experts"))
    self.b = RouterParam(jnp.zeros((num_domains,), jnp.float32), axes=("experts",))

  def params(self):
    return {"w": self.w[...], "b": self.b[...]}

  def __call__(self, tokens, prompt_valid):
    """Domain logits [B, X] from prompts tokens/prompt_valid [B, T]."""
    return classify(self.base.config, self.base.params(), self.params(), jnp.asarray(tokens, jnp.int32),
                    jnp.asarray(prompt_valid).astype(bool))


@functools.partial(jax.jit, static_argnames=("cfg",))
def classify(cfg, params, clf, tokens, valid):
  _, aux = forward(cfg, params, tokens, valid=valid, return_hidden=True)
  return layer_logits(clf["w"], clf["b"], aux["hidden"][-1], valid)


def classifier_loss(model: DomainClassifier, batch, rng):
  pm = prompt_mask(batch)
  logits = model(batch["inputs"], pm)
  label = jnp.asarray(batch["domain"], jnp.int32)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), label[:, None], -1).mean()
  return ce, {"accuracy": (jnp.argmax(logits, -1) == label).mean()}
