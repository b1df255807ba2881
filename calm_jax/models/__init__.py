"""The decoder family (llama / mistral / qwen2)."""
from calm_jax.models.config import ConfigError, DecoderConfig
from calm_jax.models.decoder import (DENSE_EQ, PLAIN, Decoder, Hooks, KVCache, ParamSpec, flatten, forward,
                                     init_params, nest, param_specs, run_layers)
