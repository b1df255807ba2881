"""calm_jax: the shared core every method imports (decoder family, HF I/O, decoding, sharding, training,
the synthetic task suite and its tiny base). It never imports a method package or configs/."""
