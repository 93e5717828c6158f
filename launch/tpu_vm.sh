#!/usr/bin/env bash
# HeTLM on a Cloud TPU VM slice: the same command on every worker (one process per host); jax.distributed finds
# the other workers from the TPU metadata, as JAX does by itself (hosts.py; --coordinator_address,
# --num_processes and --process_id override it).
#
#   TPU=my-v5e-16 ZONE=us-west4-a SETUP=1 launch/tpu_vm.sh --data=gs://my-logs/clicks/ \
#       --workdir=gs://my-runs/clicks [more hetlm flags]
#
# Run it from this repository. Change: TPU and ZONE (and PROJECT, default: gcloud's); SETUP=1 on the first run
# copies this repository to ~/hetlm_jax on every worker and installs it there (pip install -e, with jax[tpu] and the
# cloud extra, for gs://).
# The program runs as `python3 -m hetlm_jax`, which needs no PATH entry in the non-interactive ssh session.
# --data must be readable by every worker, and --workdir one place they all write: a gs:// URI (the workers share no
# disk; checkpoints, metrics and the lock live in the bucket: README, "A workdir on an object store"), or a shared
# POSIX filesystem such as Filestore (not a gcsfuse mount: it has no atomic rename and no flock);
# --batch_size a multiple of the number of TPU chips. When a spot or preemptible TPU is reclaimed, the workers get
# SIGTERM: they stop at the same safe point (a checkpoint, during training) and exit 0. Recreate the TPU (or wait
# for it) and run this same command again: it resumes.
set -euo pipefail
TPU=${TPU:?set TPU to the TPU VM name}
ZONE=${ZONE:?set ZONE to its zone}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tpu=(--zone="$ZONE" --project="$PROJECT" --worker=all)
if [[ "${SETUP:-0}" == 1 ]]; then
  tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs -czf /tmp/hetlm_jax.tar.gz .
  gcloud compute tpus tpu-vm scp /tmp/hetlm_jax.tar.gz "$TPU":/tmp/hetlm_jax.tar.gz "${tpu[@]}"
  gcloud compute tpus tpu-vm ssh "$TPU" "${tpu[@]}" --command="mkdir -p ~/hetlm_jax && tar -xzf \
/tmp/hetlm_jax.tar.gz -C ~/hetlm_jax && python3 -m pip install -q -e ~/hetlm_jax[cloud] 'jax[tpu]'"
fi
gcloud compute tpus tpu-vm ssh "$TPU" "${tpu[@]}" --command="cd ~/hetlm_jax && python3 -m hetlm_jax train $(printf '%q ' "$@")"
