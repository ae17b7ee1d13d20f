#!/usr/bin/env bash
# docs/mcad.md Table 1 and Table 4 on the bundled benchmark: every row of paper 001 Table 1 as
# one config switch (--config.mcad.loss), same student (configs/mcad.py:cpu, the dual encoder of
# `make train`), steps, batch and k for every row; then MCAD (mt+mt_fa) at k = 5 and 17. Each
# row x seed in runs/mcad_<row>_s<seed> with its test eval.json and val eval_val.json; then the
# tables (experiments/table.py).
#   SEEDS="0 1" bash experiments/mcad_table1.sh
#   ROWS="gt mt+mt_fa" KS="" SEEDS=0 bash experiments/mcad_table1.sh     # a subset
# Needs the benchmark's teachers (docs/teachers.md; ~12 + ~40 min here):
#   python -m jaxdistill.main --config=configs/teacher.py:towers --workdir=runs/loopitr_itc
#   python -m jaxdistill.main --config=configs/teacher.py:cross --workdir=runs/cross_positions_s0
# Run on an otherwise idle machine: the table's minutes are wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1"}
ROWS=${ROWS:-"gt clip gt+clip albef+gt clip+clip_fa mt mt+mt_fa"}
KS=${KS:-"5 17"}                  # Table 4: MCAD at these k besides the default 11
PY=${PY:-.venv/bin/python}
train() {   # train WORKDIR ARGS...: train (test eval.json), then the val eval, unless done
  local w=$1; shift
  local args=(--config=configs/mcad.py:cpu "$@" --workdir="$w")
  [ -f "$w/eval.json" ] || $PY -m jaxdistill.main "${args[@]}"
  [ -f "$w/eval_val.json" ] || $PY -m jaxdistill.main "${args[@]}" --mode=eval --config.eval.split=val
}
for seed in $SEEDS; do
  for row in $ROWS; do train "runs/mcad_${row}_s${seed}" --config.mcad.loss="$row" --config.seed="$seed"; done
  for k in $KS; do
    train "runs/mcad_mt+mt_fa_k${k}_s${seed}" --config.mcad.loss=mt+mt_fa --config.mcad.k="$k" --config.seed="$seed"
  done
done
table=()
for row in $ROWS; do table+=("$row=runs/mcad_${row}_s[0-9]*"); done
echo "Table 1 (k = 11):"
$PY experiments/table.py "${table[@]}"
if [ -n "$KS" ]; then
  table=()
  for k in $KS; do table+=("k $k=runs/mcad_mt+mt_fa_k${k}_s[0-9]*"); done
  echo "Table 4 (mt+mt_fa):"
  $PY experiments/table.py "${table[@]}" "k 11=runs/mcad_mt+mt_fa_s[0-9]*"
fi
