"""Step time of the MCAD recipe (configs/mcad.py, cpu preset) per Table 1 row, side by side in
one run: what reading each teacher online costs.

  .venv/bin/python benchmarks/mcad_step.py [--losses=gt,clip+clip_fa,mt+mt_fa] [--steps=6]

The teachers are untrained networks of the benchmark teacher presets' sizes
(configs/teacher.py:dual and :cpu, written by teachers.workdir.init_workdir into a temporary
directory; step time does not depend on the weights). Each row trains `steps` steps through the
real train loop and reports the seconds per step after the first log interval (compilation
excluded; the rate of the train loop's progress line). Prints a markdown table.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdistill import methods  # noqa: E402
from jaxdistill.config import load_config_file  # noqa: E402
from jaxdistill.teachers.workdir import init_workdir  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("losses", ["gt", "clip+clip_fa", "mt+mt_fa"], "mcad.loss values to time")
flags.DEFINE_integer("steps", 6, "steps per row (the first half compiles and warms up)")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def main(_):
  with tempfile.TemporaryDirectory() as root:
    init_workdir(load_config_file(f"{CONFIGS}/teacher.py:dual"), f"{root}/dual", seed=1)
    init_workdir(load_config_file(f"{CONFIGS}/teacher.py:cpu"), f"{root}/cross", seed=2)
    half = FLAGS.steps // 2
    rows = []
    for loss in FLAGS.losses:
      c = load_config_file(f"{CONFIGS}/mcad.py:cpu")
      c.teachers.dual.path, c.teachers.cross.path = f"{root}/dual", f"{root}/cross"
      c.mcad.loss = loss
      c.train.num_steps, c.train.log_every, c.train.checkpoint_every = FLAGS.steps, half, 10**6
      c.data.num_val, c.eval.split = 48, "val"
      methods.validate(c)
      workdir = f"{root}/run_{len(rows)}"
      out = io.StringIO()
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        methods.train(c, workdir)              # the progress line's rate over the last interval
      rate = float(re.findall(r"step \d+/\d+ \|\s+([\d.]+) ex/s", out.getvalue())[-1])
      rows.append((loss, ", ".join(methods.recipe_module(c).teacher_names(c)) or "none",
                   c.batch_size / rate))
  print("\n| mcad.loss | teachers read online | s / step |\n|---|---|---|")
  for loss, teachers, seconds in rows:
    print(f"| `{loss}` | {teachers} | {seconds:.2f} |")


if __name__ == "__main__":
  app.run(main)
