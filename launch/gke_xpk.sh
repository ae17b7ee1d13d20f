#!/usr/bin/env bash
# Train a recipe on a GKE TPU cluster through XPK: one process per TPU VM host, NUM_SLICES slices.
#   launch/gke_xpk.sh CLUSTER WORKLOAD TPU_TYPE NUM_SLICES IMAGE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/gke_xpk.sh my-cluster clip-distill v5litepod-256 1 gcr.io/PROJECT/jaxdistill:latest \
#     configs/clip_distill.py:v5e-256 gs://BUCKET/runs/clip_distill
# Needs xpk (pip install xpk) and gcloud with the project and zone set, a cluster made with
# `xpk cluster create --tpu-type TPU_TYPE`, and IMAGE with this repo installed as .[tpu] (its
# working directory holding configs/): the workload installs nothing. WORKDIR: gs://... (shared).
# jax.distributed.initialize() finds the hosts from the environment GKE sets.
# Which --config.mesh.fsdp / model.remat / model.dtype / train.accum_steps fit: docs/scaling.md
# (configs/clip_distill.py carries them per slice; any --config.KEY=VALUE overrides them).
# DRY_RUN=1 prints the xpk command (shell-quoted, ready to paste) and runs nothing.
set -euo pipefail
if (($# < 7)); then
  echo "usage: $0 CLUSTER WORKLOAD TPU_TYPE NUM_SLICES IMAGE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
cluster=$1 workload=$2 tpu_type=$3 num_slices=$4 image=$5 config=$6 workdir=$7; shift 7
. "$(dirname "$0")/quote.sh"

train=$(quote python -m jaxdistill.main --distributed "--config=$config" "--workdir=$workdir" "$@")
run xpk workload create --cluster "$cluster" --workload "$workload" --tpu-type "$tpu_type" \
  --num-slices "$num_slices" --docker-image "$image" --command "$train"
