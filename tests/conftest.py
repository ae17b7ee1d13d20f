"""Test set-up: 8 simulated CPU devices, so sharded code runs on a real 8-device mesh.

The flag must be set before jax is imported anywhere.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_config(name: str, preset: str = "tiny"):
  """configs/<name>.py:<preset> loaded as --config= loads it (no sys.path edits)."""
  from jaxdistill.config import load_config_file
  return load_config_file(os.path.join(REPO, "configs", f"{name}.py:{preset}"))


@pytest.fixture
def config_of():
  """config_of("loopitr", "tiny") -> configs/loopitr.py's tiny config."""
  return recipe_config
