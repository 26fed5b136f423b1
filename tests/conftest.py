"""Test-wide JAX settings: strict promotion (equinox style) and 8 CPU devices.

8 CPU devices: Mosaic GPU interpret mode runs each warpgroup on XLA's CPU pool and can deadlock with fewer
threads than warpgroups; the sharding tests also use them. Must be set before JAX initialises its backend.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
