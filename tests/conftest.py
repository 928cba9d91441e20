"""Test configuration: strict numerics so shape bugs cannot hide, 8 simulated
CPU devices for the multi-device tests, and XLA's quick compiles (set before
jax is imported; subprocesses and notebook kernels inherit them).

The suite is compile-bound. ``JAX_DISABLE_MOST_OPTIMIZATIONS`` runs XLA:CPU's
LLVM backend without its expensive passes: compiles take a fraction of the
time, and XLA's HLO passes (fusion, layouts, SPMD partitioning) run as for
users; only the machine code is less optimised. ``JAX_DISABLE_MOST_OPTIMIZATIONS=0``
in the environment runs the suite with the default compiler settings.
"""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
