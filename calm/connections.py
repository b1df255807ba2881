"""Which augmenting layer feeds which anchor layer: defaults and validation.

Layer numbers are 1-based residual-stream indices: layer i means the output of decoder layer
i (`forward(..., return_hidden=True)["hidden"][i]`), i in 1..N. A connection (i, j) takes the
augmenting model's layer-i states as keys/values and adds its cross-attention output to the
anchor's layer-j output, which then feeds anchor layer j+1. Anchor layer 0 is the embedding
output (before anchor layer 1): an extension for shallow anchors, whose first layer's attention
already gathers what later layers compute with (the paper and the official code start at the first
layer's output).
"""
from __future__ import annotations

from typing import Sequence

from calm_jax.errors import UserError
from calm_jax.models.config import DecoderConfig


class CompositionError(UserError):
  """Models or connections that cannot be composed."""


def default_augment_layers(n_aug: int, every: int = 4) -> tuple[int, ...]:
  """Every `every`-th layer output of the augmenting model (paper: "every 4th layer"): 4, 8, ..

  A model shallower than `every` contributes its last layer (n = max(1, N_A // every))."""
  n = max(1, n_aug // every)
  return tuple(min(every * (k + 1), n_aug) for k in range(n))


def default_anchor_layers(n_anchor: int, n: int) -> tuple[int, ...]:
  """n evenly spaced anchor layers starting at the first (spacing N_B / n, paper §3.1), so the
  anchor has layers left to use what it reads: 1, 1 + N_B/n, ..."""
  if n > n_anchor:
    raise CompositionError(f"{n} connections do not fit in an anchor of {n_anchor} layers")
  return tuple(1 + (k * n_anchor) // n for k in range(n))


def resolve(anchor: DecoderConfig, augment: DecoderConfig, augment_layers: Sequence[int] | None = None,
            anchor_layers: Sequence[int] | None = None, *, name: str = "augment",
            shared_tokens: bool = True) -> tuple[tuple[int, int], ...]:
  """((augment layer, anchor layer), ...) for one augmenting model, checked against both models.
  shared_tokens: the augmenting model reads the anchor's tokens, so their tokenizers must agree
  (False: it has its own tokenizer and token stream, calm/spans.py)."""
  if shared_tokens and augment.vocab_size != anchor.vocab_size:
    raise CompositionError(f"{name}: vocabulary size {augment.vocab_size} differs from the anchor's "
                           f"{anchor.vocab_size}; CALM feeds the same tokens to both models, so they need "
                           "the same tokenizer (or compose it with its own tokenizer: own_tokens)")
  specials = ("bos_token_id", "eos_token_ids", "pad_token_id")
  for s in specials if shared_tokens else ():
    a, b = getattr(augment, s, None), getattr(anchor, s, None)
    if a != b:
      raise CompositionError(f"{name}: {s} {a} differs from the anchor's {b} (different tokenizers)")
  aug = tuple(int(i) for i in augment_layers) if augment_layers is not None else default_augment_layers(
      augment.num_layers)
  anc = tuple(int(j) for j in anchor_layers) if anchor_layers is not None else default_anchor_layers(
      anchor.num_layers, len(aug))
  if not aug:
    raise CompositionError(f"{name}: no connections")
  if len(aug) != len(anc):
    raise CompositionError(f"{name}: {len(aug)} augmenting layers {list(aug)} but {len(anc)} anchor layers "
                           f"{list(anc)}; they pair one to one")
  bad = [i for i in aug if not 1 <= i <= augment.num_layers]
  if bad:
    raise CompositionError(f"{name}: augmenting layers {bad} out of range 1..{augment.num_layers}")
  bad = [j for j in anc if not 0 <= j <= anchor.num_layers]
  if bad:
    raise CompositionError(f"{name}: anchor layers {bad} out of range 0..{anchor.num_layers} "
                           "(0: the embedding output)")
  if len(set(anc)) != len(anc):
    raise CompositionError(f"{name}: anchor layers {list(anc)} repeat; one connection per anchor layer "
                           "and augmenting model")
  return tuple(zip(aug, anc))
