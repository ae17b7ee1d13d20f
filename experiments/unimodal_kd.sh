#!/usr/bin/env bash
# Paper 004's ablation table (docs/unimodal_kd.md): each row x seed trained for the same steps,
# evaluated on test (eval.json, by training) and val (eval_val.json), then tabulated.
#   STEPS=150 SEEDS="0 1" ROWS="full no_kd bank1024" bash experiments/unimodal_kd.sh
# A row is an ablation of configs/unimodal_kd.py, or bank<N>: the full recipe with a bank of N.
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
    args=(--config=configs/unimodal_kd.py:cpu,$row --workdir=$w)
    if [[ $row =~ ^bank([0-9]+)$ ]]; then
      args=(--config=configs/unimodal_kd.py:cpu,full --workdir=$w
            --config.unimodal_kd.bank_size=${BASH_REMATCH[1]})
    fi
    $PY -m jaxdistill.main "${args[@]}" --config.seed=$seed --config.train.num_steps=$STEPS
    $PY -m jaxdistill.main "${args[@]}" --mode=eval --config.eval.split=val
  done
done
args=()
for row in $ROWS; do args+=("$row=runs/ukd_${STEPS}_${row}_s*"); done
$PY experiments/table.py "${args[@]}"
