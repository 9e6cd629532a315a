#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host. SPDFQ_DISTRIBUTED=1 makes
# spdfq_jax.parallel.maybe_initialize_distributed() call jax.distributed.initialize(), which
# on a TPU VM finds the coordinator and each host's process id by itself.
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/vit_base.py:w4a4 \
#       --workdir=/mnt/shared/workdirs/vitb_w4a4 --config.data.dir=/mnt/shared/imagenet
# Every host needs the repository, the checkpoint and ImageNet at the same paths, and the
# workdir on a file system all hosts share (NFS, Filestore, gcsfuse): host 0 alone writes
# the reports, synthetic sets, PNGs and exports (the others wait for it), every host writes
# its part of the Orbax checkpoints and reads only its own share of the validation set.
# Elsewhere (GPU hosts without SLURM or Open MPI) run the same command on each host with
# JAX_COORDINATOR_ADDRESS=<host 0>:<port>, SPDFQ_NUM_PROCESSES and SPDFQ_PROCESS_ID set
# (README.md, "Several hosts").
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
