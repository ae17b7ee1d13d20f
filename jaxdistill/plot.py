"""Command line: `python -m jaxdistill.plot --workdir=runs/loopitr [--workdir=runs/other ...]`.

Writes each workdir's figures into `<workdir>/plots/` (evaluate/plots.py); with several
workdirs also `compare.png` (loss curves and R@sum side by side) into the first workdir's
`plots/`, or into `--out`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Run directory with metrics.jsonl (and "
                                      "eval.json); repeat the flag to compare runs.")
_OUT = flags.DEFINE_string("out", None, "Directory for compare.png (default: <first workdir>/plots).")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}: pass each run as --workdir=DIR")
  if not _WORKDIRS.value:
    _fail("--workdir is required, e.g. --workdir=runs/loopitr")
  from jaxdistill.evaluate.plots import PLOTS_DIR, write_comparison, write_plots
  try:
    for workdir in _WORKDIRS.value:
      for path in write_plots(workdir):
        print(f"wrote {path}")
    if len(_WORKDIRS.value) > 1:
      out = _OUT.value or os.path.join(_WORKDIRS.value[0], PLOTS_DIR)
      print(f"wrote {write_comparison(_WORKDIRS.value, os.path.join(out, 'compare.png'))}")
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main)
