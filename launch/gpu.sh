#!/usr/bin/env bash
# One GPU (or one host with several): install the CUDA build of jax, then run one config.
#   launch/gpu.sh configs/vit_base.py:w4a4 [extra flags, e.g. --config.data.dir=/data/imagenet]
# Weights go in checkpoints/<timm tag>/model.safetensors, ImageNet in data/imagenet (README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/gpu.sh CONFIG[:ARG] [flags...]}; shift
VENV=${SPDFQ_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e . "jax[cuda12]"
stem=$(basename "${CONFIG%%:*}" .py); arg=${CONFIG#*:}; [ "$arg" = "$CONFIG" ] && arg="" || arg="_$arg"
WORKDIR=${WORKDIR:-workdirs/${stem}${arg}}
mkdir -p "$WORKDIR"
# Re-running the same command resumes: finished stages are skipped, interrupted ones continue.
exec "$VENV/bin/python" -m spdfq_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" \
  2>&1 | tee -a "$WORKDIR/log.txt"
