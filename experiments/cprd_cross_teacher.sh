#!/usr/bin/env bash
# docs/cprd.md "With a cross teacher that ranks better than its dual similarity": CPRD's target
# from the cross encoder's scores (online in the step; offline from the similarity bank) against
# the same teacher's dual similarity and against ITC alone. Same student (configs/cprd.py:
# pretrained, the dual encoder of `make train`), steps and batch for every row; each row x seed
# in runs/cprd_pt_<row>_s<seed> with its test eval.json and val eval_val.json; then a table.
#   SEEDS="0 1" ROWS="none dual cross bank" bash experiments/cprd_cross_teacher.sh
# Rows: none (ITC + momentum queues alone), dual (cprd.teacher_scores=dual), cross (online
# cross-encoder P(match)), bank (the same scores from the offline bank, built once in $BANK by
# --mode=cache_teacher: each train image's and caption's top-$TOP_N by the teacher's dual
# similarity). Needs the teacher (~40 min after runs/loopitr_itc, docs/results.md):
#   python -m jaxdistill.main --config=configs/loopitr_long.py:cross_positions --workdir=runs/cross_positions_s0
# Run on an otherwise idle machine: the table's minutes are wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1"}
ROWS=${ROWS:-"none dual cross bank"}
PY=${PY:-.venv/bin/python}
TEACHER=${TEACHER:-runs/cross_positions_s0}
BANK=${BANK:-runs/cprd_pt_bank}
TOP_N=${TOP_N:-16}
common=(--config=configs/cprd.py:pretrained --config.teachers.teacher.path=$TEACHER)
for row in $ROWS; do
  case $row in
    none) extra=(--config.cprd.distill=none) ;;
    dual) extra=(--config.cprd.teacher_scores=dual) ;;
    cross) extra=(--config.cprd.teacher_scores=cross) ;;
    bank) extra=(--config.cprd.bank_dir=$BANK/teacher_cache/train)
          if [ ! -f "$BANK/teacher_cache/train/meta.json" ]; then
            /usr/bin/time -f "bank: %e s" $PY -m jaxdistill.main "${common[@]}" --mode=cache_teacher \
                --config.teacher_cache.top_n=$TOP_N --workdir=$BANK
          fi ;;
    *) echo "unknown row $row: use none, dual, cross or bank" >&2; exit 2 ;;
  esac
  for seed in $SEEDS; do
    w=runs/cprd_pt_${row}_s${seed}
    args=("${common[@]}" "${extra[@]}" --config.seed=$seed --workdir=$w)
    [ -f "$w/eval.json" ] || $PY -m jaxdistill.main "${args[@]}"
    [ -f "$w/eval_val.json" ] || $PY -m jaxdistill.main "${args[@]}" --mode=eval --config.eval.split=val
  done
done
table=()
for row in $ROWS; do table+=("$row=runs/cprd_pt_${row}_s*"); done
$PY experiments/table.py "${table[@]}"
