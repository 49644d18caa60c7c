import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Multi-device tests run on 8 virtual CPU devices; single-device tests use device 0 only.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests must not run float32 matmuls at reduced precision on accelerators.
jax.config.update("jax_default_matmul_precision", "highest")
