#!/usr/bin/env bash
# Several nodes with torchrun and a c10d rendezvous: run this same command on EVERY node.
#
#   MASTER_ADDR=node01 NNODES=2 launch/multi_node.sh --config configs/imagenet_resnet50.yaml output_dir=runs/r50
#
# MASTER_ADDR (required): a host every node can reach (e.g. the first node). MASTER_PORT: rendezvous port
# (default 29500). NNODES (required): number of nodes. NPROC: processes per node (default: visible GPUs).
# RUN_ID: rendezvous id shared by the nodes of one run (default ddp_resnet). TORCHRUN: default torchrun.
# Under SLURM prefer python -m ddp_resnet.slurm (or slurm/train.sbatch): srun starts one task per GPU.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to a host all nodes can reach}"
: "${NNODES:?set NNODES to the number of nodes}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC" -gt 0 ]] || { echo "multi_node.sh: no GPU found; set NPROC" >&2; exit 2; }
fi
exec ${TORCHRUN:-torchrun} --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RUN_ID:-ddp_resnet}" \
    -m ddp_resnet.train "$@"
