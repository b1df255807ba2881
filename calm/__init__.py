"""CALM: composing a frozen anchor with frozen augmenting models (arXiv 2401.02412).

`compose` (parameters, cross-attention, the composed forward, the `Composed` NNX module),
`spans` and `text_decoding` (augmenting models with their own tokenizer: end keys, decoding),
`compose_files` (method "calm_compose": your models and dataset files),
`connections` (default layer pairing and validation), `decoding` (iterative decoding with one
cache per model), `kv_tasks` (the key-value arithmetic data), `kv_arithmetic` (the Table 1
experiment, method "calm_kv_arithmetic").
"""
from calm.compose import (AugStream, CalmCache, Composed, CompositionSpec, compose_param_specs, cross_mask, forward,
                          init_compose_params, prompt_mask)
from calm.connections import CompositionError, default_anchor_layers, default_augment_layers
from calm.decoding import generate, generate_arrays

__all__ = ["AugStream", "cross_mask", "CalmCache", "Composed", "CompositionSpec", "CompositionError",
           "compose_param_specs", "forward", "init_compose_params", "prompt_mask", "default_anchor_layers",
           "default_augment_layers", "generate", "generate_arrays"]
