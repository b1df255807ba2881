"""The SVF parametrisation (Transformer² eq. 1, as the official code composes it).

  W' = U · diag(σ ⊙ m) · Vᵀ · (Σσ / Σ(σ ⊙ m)),   m = f(z)

f is "sigmoid" (official code) or "identity" (paper). The rescale keeps the nuclear norm
Σσ fixed, so W' depends on m only up to a global scale: any constant m gives W' = W.
z is one vector per target matrix and layer ([L, k] per target), an `SVFParam`; the base
parameters and the SVD factors are frozen.

Mixing convention (used everywhere: CEM, dispatch, the suite): experts are mixed on z,
before f:  z' = Σ_k α_k z_k  (α [K] global, or α [K, L] per layer), then m = f(z').
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm_jax.models.decoder import Decoder, forward
from calm_jax.variables import SVFParam
from svf.decompose import Factors

MASKS = {"sigmoid": jax.nn.sigmoid, "identity": lambda z: z}
# Logical axes of SVF's own arrays; configs add `SVF_RULES` to their sharding rules.
SVF_RULES = [("svd_rows", None), ("svd_cols", None), ("singular", None)]


def mask_fn(f: str):
  try:
    return MASKS[f]
  except KeyError:
    raise ValueError(f"unknown SVF mask function {f!r}; known: {', '.join(MASKS)}") from None


def compose(u, s, v, z, f: str = "sigmoid"):
  """W' of one matrix: u [r, k], s [k], v [c, k], z [k] -> [r, c] (fp32)."""
  m = mask_fn(f)(z.astype(jnp.float32))
  sm = s * m
  return (u * sm) @ v.T * (jnp.sum(s) / jnp.sum(sm))


def compose_stack(fac: Factors, z, f: str = "sigmoid"):
  """W' of every stacked layer: z [L, k] -> [L, rows, cols]."""
  return jax.vmap(compose, in_axes=(0, 0, 0, 0, None))(fac.u, fac.s, fac.v, z, f)


@functools.partial(jax.jit, static_argnames=("f",))
def adapted_params(params, factors: dict[str, Factors], zs: dict[str, jax.Array], f: str = "sigmoid"):
  """The base's nested params with every target replaced by its W' (cast to the storage dtype)."""
  layers = dict(params["layers"])
  for name, z in zs.items():
    leaf = name.split("/")[-1]
    w = layers[leaf]
    layers[leaf] = compose_stack(factors[name], z, f).reshape(w.shape).astype(w.dtype)
  return {**params, "layers": layers}


def mix(stacked: dict[str, jax.Array], alpha):
  """z' = Σ_k α_k z_k on raw z (before f). stacked: name -> [K, L, k]; alpha [K] or [K, L]."""
  alpha = jnp.asarray(alpha, jnp.float32)
  eq = "k,klr->lr" if alpha.ndim == 1 else "kl,klr->lr"
  return {n: jnp.einsum(eq, alpha, z.astype(jnp.float32)) for n, z in stacked.items()}


def num_params(zs) -> int:
  return int(sum(np.size(z) for z in jax.tree.leaves(zs)))


class SVDFactor(nnx.Variable):
  """Frozen SVD factors (never a trainable type)."""


class _Holder(nnx.Module):
  pass


def _leaf(name: str) -> str:
  return name.split("/")[-1]


class SVFModel(nnx.Module):
  """A frozen base decoder + frozen SVD factors + trainable z vectors (SVFParam).

  Calling it (`model(tokens, attention_mask)`) runs the decoder with W'; `adapted_params()`
  is the pytree that `forward` / `generate(params=...)` take.
  """

  def __init__(self, base: Decoder, factors: dict[str, Factors], *, f: str = "sigmoid", init: float = 0.1,
               noise: float = 0.0, seed: int = 0, zs: dict[str, Any] | None = None):
    mask_fn(f)
    if not factors:
      raise ValueError("SVFModel needs at least one target matrix")
    self.config = base.config
    self.base = base
    self.f = f
    self.targets = tuple(sorted(factors))
    self.svd = _Holder()
    self.z = _Holder()
    rng = np.random.default_rng(seed)
    for name in self.targets:
      fac = factors[name]
      setattr(self.svd, _leaf(name) + "_u", SVDFactor(jnp.asarray(fac.u), axes=("layers", "svd_rows", "singular")))
      setattr(self.svd, _leaf(name) + "_s", SVDFactor(jnp.asarray(fac.s), axes=("layers", "singular")))
      setattr(self.svd, _leaf(name) + "_v", SVDFactor(jnp.asarray(fac.v), axes=("layers", "svd_cols", "singular")))
      shape = tuple(fac.s.shape)
      if zs is not None:
        z = np.asarray(zs[name], np.float32)
        if z.shape != shape:
          raise ValueError(f"z for {name}: shape {z.shape}, the factors need {shape}")
      else:
        z = init + noise * rng.standard_normal(shape).astype(np.float32)
      setattr(self.z, _leaf(name), SVFParam(jnp.asarray(z, jnp.float32), axes=("layers", "singular")))

  def factors(self) -> dict[str, Factors]:
    return {n: Factors(*(getattr(self.svd, f"{_leaf(n)}_{p}")[...] for p in "usv")) for n in self.targets}

  def zs(self) -> dict[str, jax.Array]:
    return {n: getattr(self.z, _leaf(n))[...] for n in self.targets}

  def set_zs(self, zs: dict[str, Any]) -> None:
    for n in self.targets:
      getattr(self.z, _leaf(n))[...] = jnp.asarray(zs[n], jnp.float32)

  def adapted_params(self, zs=None):
    return adapted_params(self.base.params(), self.factors(), self.zs() if zs is None else zs, self.f)

  def __call__(self, input_ids, attention_mask=None):
    tokens = jnp.asarray(input_ids, jnp.int32)
    valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    return forward(self.config, self.adapted_params(), tokens, valid=valid)[0]
