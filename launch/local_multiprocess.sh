#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices: exercises the multi-host code paths
# (per-process data shards, global array assembly, orbax multi-process saves, the SIGTERM
# agreement) without a cluster.
#   launch/local_multiprocess.sh 2 configs/loopitr.py:tiny /tmp/mp [overrides]
# DEVICES_PER_PROCESS (default 4) CPU devices per process; JAX_COORDINATOR_PORT (default: a free
# port). The processes' output goes to this terminal. SIGTERM or SIGINT to this script is
# forwarded to every process (they save one agreed step and exit 0). Exits with the first nonzero
# exit code of the processes, else 0.
set -uo pipefail
if (($# < 3)); then
  echo "usage: $0 NUM_PROCESSES CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3; shift 3
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
devices=${DEVICES_PER_PROCESS:-4}
port=${JAX_COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# Drop any device count already in XLA_FLAGS (e.g. a test's 8); each process gets $devices.
flags=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
mkdir -p "$workdir"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} XLA_FLAGS="$flags --xla_force_host_platform_device_count=$devices" \
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    "$python" -m jaxdistill.main --distributed --config="$config" --workdir="$workdir" "$@" &
  pids+=($!)
done
echo "processes: ${pids[*]} (coordinator 127.0.0.1:$port)"
trapped=0
forward() { trapped=1; kill -"$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
for pid in "${pids[@]}"; do
  while true; do
    trapped=0
    wait "$pid"
    rc=$?
    # A trapped signal interrupts `wait` (rc > 128) without the process having ended: wait again
    # (for a process that has ended, bash returns its remembered exit code).
    ((trapped)) || break
  done
  if ((rc != 0 && status == 0)); then status=$rc; fi
done
exit $status
