"""Every notebook in notebooks/ runs top to bottom: its code cells are executed in order, in one
namespace, in a fresh python process started in the repository root (no jupyter needed)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))

# Runs the cells given as a JSON list on stdin; a failing cell is named in the traceback.
_DRIVER = """
import json, sys
cells = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for index, source in enumerate(cells):
  print(f"--- cell {index}", flush=True)
  exec(compile(source, f"{sys.argv[1]} code cell {index}", "exec"), namespace)
"""


def _code_cells(path: str) -> list[str]:
  with open(path) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4, f"{path}: nbformat {notebook['nbformat']}, expected 4"
  cells = []
  for cell in notebook["cells"]:
    assert cell["cell_type"] in ("code", "markdown", "raw"), cell["cell_type"]
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    if cell["cell_type"] == "code":
      assert not cell.get("outputs"), f"{path}: commit notebooks without outputs"
      cells.append(source)
  return cells


def test_there_are_notebooks():
  assert NOTEBOOKS, "notebooks/*.ipynb not found"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  cells = _code_cells(path)
  assert cells, f"{path} has no code cells"
  # one CPU device, like a user's kernel; temporary workdirs under tmp_path
  env = dict(os.environ, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu", XLA_FLAGS="", MPLBACKEND="Agg")
  done = subprocess.run([sys.executable, "-c", _DRIVER, os.path.basename(path)],
                        input=json.dumps(cells), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  assert f"--- cell {len(cells) - 1}" in done.stdout
