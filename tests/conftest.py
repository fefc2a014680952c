"""Test-wide JAX settings: float64 available, strict promotion, so that mistakes fail loudly."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
