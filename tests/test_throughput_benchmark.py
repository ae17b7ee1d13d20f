"""benchmarks/throughput.py at a tiny size: the jaxdistill step and its open_clip twin both build
and run on the cpu preset (batch 4, one timed step each), their parameter counts agree (the
architecture match: same towers, stem, pooling, projections), and the printed row has the
table's columns. No wall-clock assertions."""

import importlib.util
import math

import pytest

from benchmarks import throughput

# open_clip comes with the `throughput` extra, installed in its own venv (PyPI's CUDA torchvision
# breaks transformers' torch models next to the CPU torch): run these there, e.g.
#   python3 -m venv .venv-throughput && .venv-throughput/bin/pip install -c constraints.txt \
#       -e .[throughput,test] && .venv-throughput/bin/python -m pytest tests/test_throughput_benchmark.py
# (no bare `import open_clip`: it fails before throughput.import_open_clip's torchvision fix-up).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                reason="open-clip-torch not installed: pip install -e .[throughput] "
                                       "in its own venv (tests/test_throughput_benchmark.py)")


def test_cpu_preset_row_builds_matches_and_runs():
  row = throughput.run_row("cpu", 4, steps=1, rounds=1, peak_gflops=1.0)
  # Same architecture: within 1% (measured: identical, 1,070,465 each).
  assert row["jax_params"] > 1_000_000
  assert abs(row["jax_params"] - row["torch_params"]) / row["jax_params"] < 0.01
  for key in ("jax_ex_s", "torch_ex_s", "ratio", "gflop", "gflops", "peak_pct"):
    assert math.isfinite(row[key]) and row[key] > 0, key
  line = throughput.format_row(row)
  cells = [c.strip() for c in line.strip().strip("|").split("|")]
  assert len(cells) == throughput.COLUMNS == 10
  assert cells[:2] == ["cpu", "4"]
  assert cells[2] == f"{row['jax_params']:,}" and cells[3] == f"{row['torch_params']:,}"


def test_open_clip_twin_embeds_like_the_student():
  """The open_clip twin's forward on the synthetic batch gives unit-norm [B, embed_dim]
  features for both towers (the swapped conv stem and concat pooling are wired in)."""
  import torch
  config = throughput.row_config("cpu", 2)
  batch = throughput.synthetic_batch(config)
  model = throughput.build_open_clip_model(config)
  out = model(torch.from_numpy(batch["image"]).permute(0, 3, 1, 2),
              torch.from_numpy(batch["text_ids"]).long())
  for key in ("image_features", "text_features"):
    assert tuple(out[key].shape) == (2, config.model.embed_dim)
    assert torch.allclose(out[key].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_rows_selection():
  assert throughput.selected_rows(["32", "128"], 8, []) == [("cpu", 32), ("cpu", 128),
                                                            ("vit_b16", 8)]
  assert throughput.selected_rows(["32", "128"], 8, ["vit_b16", "cpu32"]) == [("vit_b16", 8),
                                                                               ("cpu", 32)]
