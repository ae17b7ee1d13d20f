#!/usr/bin/env bash
# Paper 004's ablation table (docs/unimodal_kd.md): each row x seed trained for the same steps,
# evaluated on test (eval.json, by training) and val (eval_val.json), then tabulated.
#   STEPS=150 SEEDS="0 1" ROWS="full no_kd" bash experiments/unimodal_kd.sh
# Needs runs/ssl_vit (configs/ssl_vit.py). Run on an otherwise idle machine: the table's
# training minutes are wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-150}
SEEDS=${SEEDS:-"0 1"}
ROWS=${ROWS:-"full no_kd no_bank every_second random_init mean"}
PY=${PY:-.venv/bin/python}
for seed in $SEEDS; do
  for row in $ROWS; do
    w=runs/ukd_${STEPS}_${row}_s${seed}
    [ -f "$w/eval_val.json" ] && continue
    $PY -m jaxdistill.main --config=configs/unimodal_kd.py:cpu,$row --workdir=$w \
        --config.seed=$seed --config.train.num_steps=$STEPS
    $PY -m jaxdistill.main --config=configs/unimodal_kd.py:cpu,$row --workdir=$w \
        --mode=eval --config.eval.split=val
  done
done
args=()
for row in $ROWS; do args+=("$row=runs/ukd_${STEPS}_${row}_s*"); done
$PY experiments/table.py "${args[@]}"
