#!/usr/bin/env bash
# One process on one GPU, no process group: for debugging (breakpoints, pdb, stack traces).
#
#   launch/debug_single_gpu.sh --config configs/cifar10_resnet18.yaml output_dir=runs/debug data.workers=0
#
# GPU: which GPU (default 0). Kernel launches are synchronous (CUDA_LAUNCH_BLOCKING=1) so errors point at
# the failing line; add data.workers=0 to keep data loading in this process. PYTHON: default python.
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${GPU:-0}"
export CUDA_LAUNCH_BLOCKING=1
exec "${PYTHON:-python}" -m ddp_resnet.train "$@"
