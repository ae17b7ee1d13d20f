"""Step time of the MCAD recipe (configs/mcad.py, cpu preset) per Table 1 row, side by side in
one run: what reading each teacher online costs, with the teachers in float32 and in bfloat16.

  .venv/bin/python benchmarks/mcad_step.py [--losses=gt,clip+clip_fa,mt+mt_fa] [--steps=6] \
      [--dtypes=float32,bfloat16]

The teachers are untrained networks of the benchmark teachers' sizes (configs/teacher.py:towers
for the dual stream and :cross for the single stream, written by teachers.workdir.init_workdir
into a temporary directory; step time does not depend on the weights). Each row trains `steps`
steps through the real train loop and reports the seconds per step after the first log interval
(compilation excluded; the rate of the train loop's progress line). A row that reads no teacher
runs once. Prints a markdown table.
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
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "teacher dtypes (config.teachers.<name>.dtype)")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def main(_):
  with tempfile.TemporaryDirectory() as root:
    init_workdir(load_config_file(f"{CONFIGS}/teacher.py:towers"), f"{root}/dual", seed=1)
    init_workdir(load_config_file(f"{CONFIGS}/teacher.py:cross"), f"{root}/cross", seed=2)
    half = FLAGS.steps // 2
    rows = []
    for loss in FLAGS.losses:
      for dtype in FLAGS.dtypes:
        c = load_config_file(f"{CONFIGS}/mcad.py:cpu")
        c.mcad.loss = loss
        names = methods.recipe_module(c).teacher_names(c)
        if not names and dtype != FLAGS.dtypes[0]:
          continue
        for name, path in (("dual", f"{root}/dual"), ("cross", f"{root}/cross")):
          c.teachers[name].path, c.teachers[name].dtype = path, dtype
        c.train.num_steps, c.train.log_every, c.train.checkpoint_every = FLAGS.steps, half, 10**6
        c.data.num_val, c.eval.split = 48, "val"
        methods.validate(c)
        workdir = f"{root}/run_{len(rows)}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
          methods.train(c, workdir)              # the progress line's rate over the last interval
        rate = float(re.findall(r"step \d+/\d+ \|\s+([\d.]+) ex/s", out.getvalue())[-1])
        rows.append((loss, ", ".join(names) or "none", dtype if names else "-",
                     c.batch_size / rate))
  print("\n| mcad.loss | teachers read online | teacher dtype | s / step |\n|---|---|---|---|")
  for loss, teachers, dtype, seconds in rows:
    print(f"| `{loss}` | {teachers} | {dtype} | {seconds:.2f} |")


if __name__ == "__main__":
  app.run(main)
