#!/usr/bin/env bash
# Train a recipe on every host of a Cloud TPU VM slice (v4/v5e/v5p), one process per host.
#   launch/tpu_vm.sh NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   e.g. launch/tpu_vm.sh my-v5e-256 us-west4-a configs/clip_distill.py:v5e-256 gs://BUCKET/runs/clip_distill
# Needs gcloud (logged in, project set) and the TPU VM slice NAME in ZONE. Copies this checkout to
# every worker, installs the pinned stack with TPU jaxlib (.[tpu]) in ~/jaxdistill/.venv, and runs.
# WORKDIR must be shared by all hosts (gs://... or a shared filesystem): orbax writes there.
# Which --config.mesh.fsdp / model.remat / model.dtype / train.accum_steps fit: docs/scaling.md
# (configs/clip_distill.py carries them per slice; any --config.KEY=VALUE overrides them).
# DRY_RUN=1 prints the commands (shell-quoted, one per line, ready to paste) and runs nothing.
set -euo pipefail
if (($# < 4)); then
  echo "usage: $0 NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
name=$1 zone=$2 config=$3 workdir=$4; shift 4
cd "$(dirname "$0")/.."
. launch/quote.sh

train=$(quote .venv/bin/python -m jaxdistill.main --distributed "--config=$config" \
  "--workdir=$workdir" "$@")
run gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
  pyproject.toml constraints.txt README.md jaxdistill configs "$name:~/jaxdistill/"
run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "set -e; \
cd ~/jaxdistill; [ -x .venv/bin/python ] || python3 -m venv .venv; \
.venv/bin/pip install -q -c constraints.txt -e \".[tpu]\"; $train"
