"""Test set-up: 8 simulated CPU devices, so sharded code runs on a real 8-device mesh.

The flag must be set before jax is imported anywhere.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
