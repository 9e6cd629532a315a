#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host; jax.distributed.initialize() joins
# them (spdfq_jax.parallel.maybe_initialize_distributed, switched on by SPDFQ_DISTRIBUTED=1)
# and the batch is split over every chip of every host.
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/vit_base.py:w4a4 \
#       --workdir=/mnt/shared/workdirs/vitb_w4a4 --config.data.dir=/mnt/shared/imagenet
# Needs the repository, the checkpoint and ImageNet on every host at the same paths, and a
# workdir on a file system all hosts share (NFS, Filestore, gcsfuse): host 0 writes the
# reports, every host reads the stage outputs.
set -euo pipefail
TPU=${TPU:?set TPU to the TPU VM name}; ZONE=${ZONE:?set ZONE}
CONFIG=${1:?usage: TPU=... ZONE=... launch/tpu_pod.sh CONFIG[:ARG] [flags...]}; shift
REPO=${REPO:-\$HOME/spdfq_jax}
FLAGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q -e . 'jax[tpu]'
  SPDFQ_DISTRIBUTED=1 .venv/bin/python -m spdfq_jax.main --config=$CONFIG $FLAGS"
