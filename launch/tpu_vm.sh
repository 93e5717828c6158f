#!/usr/bin/env bash
# HeTLM on a Cloud TPU VM slice: the same command on every worker (one process per host); jax.distributed finds
# the other workers from the TPU metadata.
#
#   TPU=my-v5e-16 ZONE=us-west4-a SETUP=1 launch/tpu_vm.sh --data=/mnt/data/clicks.parquet \
#       --workdir=/mnt/runs/clicks [more hetlm flags]
#
# Change: TPU and ZONE (and PROJECT, default: gcloud's), PACKAGE (what pip installs on the workers: a wheel, a git
# URL or a path on them) and SETUP=1 on the first run to install it. --data must be readable and --workdir
# shared by every worker (e.g. a bucket mounted with gcsfuse, or Filestore); --batch_size a multiple of the
# number of TPU chips. When a spot or preemptible TPU is reclaimed, the workers get SIGTERM: they save a
# checkpoint at the same step and exit 0. Recreate the TPU (or wait for it) and run this same command again:
# it resumes from that checkpoint.
set -euo pipefail
TPU=${TPU:?set TPU to the TPU VM name}
ZONE=${ZONE:?set ZONE to its zone}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
PACKAGE=${PACKAGE:-hetlm_jax}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}
if [[ "${SETUP:-0}" == 1 ]]; then
  ssh_all "pip install -q 'jax[tpu]' $(printf '%q' "$PACKAGE")"
fi
ssh_all "hetlm train $(printf '%q ' "$@")"
