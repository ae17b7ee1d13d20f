#!/usr/bin/env bash
# Train a recipe on every host of a Cloud TPU VM slice (v4/v5e/v5p), one process per host.
#   launch/tpu_vm.sh NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
# Copies this checkout to every worker, installs the pinned stack with TPU jaxlib, and runs.
# WORKDIR must be shared by all hosts (gs://... or a shared filesystem): orbax writes there.
set -euo pipefail
name=$1 zone=$2 config=$3 workdir=$4; shift 4
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
  pyproject.toml constraints.txt README.md jaxdistill configs "$name":~/jaxdistill/
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e; cd ~/jaxdistill
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'
  .venv/bin/python -m jaxdistill.main --distributed --config=$config --workdir=$workdir $*"
