"""Variable types that say what trains.

The base model's `nnx.Param` is frozen in every method; a method's own parameters are one of
these subclasses, and each method hands the trainer exactly the types it trains
(`calm_jax.train.train(model, trainable=SVFParam, ...)`): gradients, optimizer state and
checkpoints exist for those only.
"""
from __future__ import annotations

from flax import nnx


class LoRAParam(nnx.Param):
  """Low-rank adapter factors (calm_jax.lora, moa/)."""


class SVFParam(nnx.Param):
  """Singular-value scaling vectors z (svf/)."""


class ComposeParam(nnx.Param):
  """CALM projections and cross-attention (calm/)."""


class RouterParam(nnx.Param):
  """MoA routers (moa/)."""
