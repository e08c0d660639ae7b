#!/usr/bin/env bash
# CPU smoke test: 2 processes with gloo on this machine, the tiny configs/cpu_smoke.yaml run (about a minute).
#
#   launch/cpu_smoke.sh [key=value ...]          e.g. launch/cpu_smoke.sh output_dir=runs/smoke train.epochs=1
#
# Works from any directory (relative output_dir values are relative to it). NPROC: processes (default 2).
# TORCHRUN: the torchrun command (default torchrun).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec ${TORCHRUN:-torchrun} --standalone --nnodes=1 --nproc_per_node="${NPROC:-2}" -m ddp_resnet.train \
    --config "$ROOT/configs/cpu_smoke.yaml" train.device=cpu dist.backend=gloo "$@"
