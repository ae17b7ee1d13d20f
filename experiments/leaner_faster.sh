#!/usr/bin/env bash
# Paper 000's Tables 1-2 on the bundled benchmark (docs/leaner_faster.md): each row x seed is one
# pipeline (configs/leaner_faster.py:<preset>) in runs/lf_<preset>_<row>_s<seed>; every stage
# writes its test-split eval.json, the final student also eval_val.json (val: what choices are
# made on); then a table.
#   PRESET=short SEEDS="0 1" ROWS="full wo_kd_hn direct" bash experiments/leaner_faster.sh
#   PRESET=short SOURCE=wo_kd ROWS="wo_kd wo_hn stage1_infonce" bash experiments/leaner_faster.sh
# A row is an ablation of configs/leaner_faster.py (full, wo_stage1, stage1_mse, stage1_infonce,
# wo_sf, wo_kd, wo_hn, wo_kd_hn, direct) or full_tl<N>: the full pipeline with an N-layer student
# text tower. Every other row reuses the common stages of runs/lf_<preset>_<SOURCE>_s<seed> (the
# teacher's fine-tuning, stage 1, the teacher's banks: config.pipeline.reuse), so list SOURCE
# (default full; any Table 2 row that has these stages will do) first; direct reuses
# stage1_infonce's stage 1. Rows run one after another, each for all seeds. Needs the dual teacher:
#   python -m jaxdistill.main --config=configs/teacher.py:dual --workdir=runs/teacher_dual
# Run on an otherwise idle machine: the table's minutes are wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-cpu}
SEEDS=${SEEDS:-"0 1"}
ROWS=${ROWS:-"full wo_kd_hn wo_hn wo_kd wo_sf wo_stage1 stage1_mse stage1_infonce direct full_tl1"}
PY=${PY:-.venv/bin/python}
TEACHER=${TEACHER:-runs/teacher_dual}
SOURCE=${SOURCE:-full}
for row in $ROWS; do
  for seed in $SEEDS; do
    w=runs/lf_${PRESET}_${row}_s${seed}
    arg=$PRESET,$row
    if [[ $row =~ ^full_tl([0-9]+)$ ]]; then arg=$PRESET,full,text_layers=${BASH_REMATCH[1]}; fi
    reuse=runs/lf_${PRESET}_${SOURCE}_s${seed}
    if [ "$row" = direct ]; then reuse=runs/lf_${PRESET}_stage1_infonce_s${seed}; fi
    args=(--config=configs/leaner_faster.py:$arg --config.seed=$seed
          --config.teachers.teacher.path=$TEACHER)
    shared=()
    if [ "$row" != "$SOURCE" ] && [ -f "$reuse/pipeline_config.json" ]; then
      shared=(--config.pipeline.reuse=$reuse)
    fi
    $PY -m jaxdistill.main "${args[@]}" "${shared[@]}" --workdir=$w
    final=$($PY -c "import json, sys; print([s for s in json.load(open(sys.argv[1]))['stages']
                    if s['kind'] == 'train'][-1]['workdir'])" "$w/pipeline.json")
    if [ ! -f "$final/eval_val.json" ]; then
      $PY -m jaxdistill.main "${args[@]}" --mode=eval --config.eval.split=val --workdir=$final \
          --config.data.tokenizer=$TEACHER/tokenizer.json --config.data.train_split=train
    fi
  done
done
table=()
for row in $ROWS; do table+=("$row=runs/lf_${PRESET}_${row}_s*"); done
$PY experiments/table.py "T ($TEACHER)=$TEACHER" "T' (fine-tuned)=runs/lf_${PRESET}_${SOURCE}_s*/teacher_text" \
    "${table[@]}"
