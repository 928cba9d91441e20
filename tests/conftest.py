"""Test configuration: strict numerics so shape bugs cannot hide."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
