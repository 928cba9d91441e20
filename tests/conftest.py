"""Test configuration: strict numerics so shape bugs cannot hide, and 8
simulated CPU devices for the multi-device tests (set before jax is imported)."""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
