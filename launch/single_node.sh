#!/usr/bin/env bash
# One node, one process per GPU, rendezvous on localhost (torchrun --standalone).
#
#   launch/single_node.sh --config configs/cifar10_resnet18.yaml output_dir=runs/r18 [key=value ...]
#
# NPROC: processes (default: the number of visible GPUs). TORCHRUN: the torchrun command (default torchrun).
# Stop with SIGTERM (torchrun forwards it): the trainer checkpoints and exits 75; rerun the same command to
# resume (ckpt.resume=auto).
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC" -gt 0 ]] || { echo "single_node.sh: no GPU found; set NPROC (or use launch/cpu_smoke.sh)" >&2; exit 2; }
fi
exec ${TORCHRUN:-torchrun} --standalone --nnodes=1 --nproc_per_node="$NPROC" -m ddp_resnet.train "$@"
