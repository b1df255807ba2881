"""Variable types that say what trains.

The base model's `nnx.Param` is frozen in every method; a method's own parameters are one of
these subclasses, and the trainer takes gradients and optimizer state for exactly the types
named in `config.trainable`. Checkpoints of a method save only those.
"""
from __future__ import annotations

from flax import nnx


class LoRAParam(nnx.Param):
  """Low-rank adapter factors (moa/)."""


class SVFParam(nnx.Param):
  """Singular-value scaling vectors z (svf/)."""


class ComposeParam(nnx.Param):
  """CALM projections and cross-attention (calm/)."""


class RouterParam(nnx.Param):
  """MoA routers (moa/)."""


VARIABLE_TYPES = {
    "Param": nnx.Param, "LoRAParam": LoRAParam, "SVFParam": SVFParam,
    "ComposeParam": ComposeParam, "RouterParam": RouterParam,
}


def variable_type(name: str):
  try:
    return VARIABLE_TYPES[name]
  except KeyError:
    raise ValueError(f"unknown variable type {name!r}; known: {', '.join(VARIABLE_TYPES)}") from None


def method_params(name: str):
  """A filter for exactly one method type, excluding subclasses of it (Param means base only)."""
  t = variable_type(name)
  return lambda path, v: type(v) is t
