"""Pure building blocks of the decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Numerics follow the Hugging Face PyTorch reference: norms, RoPE tables and softmax in fp32,
matmuls in the storage dtype, cast back once.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax.models.config import DecoderConfig

NEG_INF = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


def rms_norm(x, weight, eps):
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
  """Inverse frequencies [head_dim/2] (fp32), with linear or llama3 scaling."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  inv = inv.astype(np.float32)
  if cfg.rope_type == "linear":
    inv = inv / np.float32(cfg.rope_factor)
  elif cfg.rope_type == "llama3":
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_positions
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def rope_tables(cfg: DecoderConfig, positions):
  """cos/sin [B, T, head_dim] in fp32 for integer positions [B, T]."""
  inv = jnp.asarray(rope_inv_freq(cfg))
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, heads, D]; the rotate-half (non-interleaved) convention of HF llama."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def attention_mask(q_slots, kv_valid, window=None):
  """Boolean [B, T, S]: causal over cache slots, valid keys, optional sliding window.

  q_slots: [T] slot index of each query; kv_valid: [B, S]; window: traced scalar, 0 = full.
  Matches HF's `kv_idx > q_idx - sliding_window`.
  """
  kv_slots = jnp.arange(kv_valid.shape[1])
  allowed = kv_slots[None, :] <= q_slots[:, None]
  if window is not None:
    allowed &= (window == 0) | (kv_slots[None, :] > q_slots[:, None] - window)
  return allowed[None] & kv_valid[:, None, :]


def gqa_attention(q, k, v, mask, *, heads_major=False):
  """q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S] -> [B,T,H,D]; query head h uses kv head h // (H/KV).

  heads_major: k/v are [B,KV,S,D] (the KV-cache layout: the attention dots read it as is,
  where [B,S,KV,D] would be transposed, a copy of the whole cache per layer and step).
  """
  b, t, h, d = q.shape
  kvh = k.shape[1] if heads_major else k.shape[2]
  kv = "bksd" if heads_major else "bskd"
  q = q.reshape(b, t, kvh, h // kvh, d)
  scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
  return out.reshape(b, t, h, d)
