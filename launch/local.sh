#!/usr/bin/env bash
# A multi-host job rehearsed on one machine: N processes joined by jax.distributed over localhost, each with D
# CPU devices, each running the same command. tests/test_multiprocess.py runs it.
#
#   launch/local.sh N D hetlm train --workdir=runs/local [flags...]
#
# Each process gets --coordinator_address=localhost:PORT --num_processes=N --process_id=i (PORT: a free one, or
# $PORT). Ctrl-C or SIGTERM reaches every process: each saves a checkpoint at the same step and exits 0, and the
# same command resumes (with any N and D that divide --batch_size).
set -euo pipefail
N=${1:?usage: launch/local.sh PROCESSES DEVICES_PER_PROCESS COMMAND...}
D=${2:?usage: launch/local.sh PROCESSES DEVICES_PER_PROCESS COMMAND...}
shift 2
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu \
    "$@" --coordinator_address="localhost:$PORT" --num_processes="$N" --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
