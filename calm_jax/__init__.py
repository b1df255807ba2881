"""calm_jax: the shared core (decoder family, HF I/O, decoding, sharding, training) and CALM."""
