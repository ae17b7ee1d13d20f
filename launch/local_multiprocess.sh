#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices: exercises the multi-host code paths
# (per-process data shards, global array assembly, orbax multi-process saves) without a cluster.
#   launch/local_multiprocess.sh 2 configs/loopitr.py:tiny /tmp/mp [overrides]
set -euo pipefail
n=$1 config=$2 workdir=$3; shift 3
port=$((20000 + RANDOM % 10000))
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    .venv/bin/python -m jaxdistill.main --distributed --config="$config" --workdir="$workdir" "$@" &
done
wait
