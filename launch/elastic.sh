#!/usr/bin/env bash
# An elastic job: torchrun agents on between MIN and MAX nodes; run this same command on EVERY node, now or later.
#
#   launch/elastic.sh --endpoint=node01:29500 --nnodes=2:4 --config configs/imagenet_resnet50.yaml \
#       output_dir=/shared/runs/r50 ckpt.every_steps=500 data.max_rank_batch=256
#
# A node lost (its agent and processes gone) makes the others' processes fail; their agents restart them at the
# smaller world size, resuming from the newest checkpoint (ckpt.every_steps bounds the steps lost). A node that
# starts later waits; the running agents stop their processes (SIGTERM: the trainer checkpoints this step, exit 75)
# and all restart at the larger size. The global batch is kept; data.max_rank_batch bounds the per-rank batch
# (accumulation rises on fewer nodes). output_dir must be on storage every node shares.
#
# --endpoint=HOST:PORT or RDZV_ENDPOINT (required): the c10d rendezvous store, served by the node whose address it
# is: that node must stay up for the whole job (the others may come and go). --nnodes=MIN:MAX or NNODES (required).
# NPROC: processes per node (default: visible GPUs). MAX_RESTARTS (default 10): restarts each agent allows; a node
# lost costs one, a node joining may cost one. RUN_ID: the rendezvous id of the job (default ddp_resnet).
# RDZV_CONF: extra rendezvous settings, e.g. last_call_timeout=30 (how long a restart waits for more nodes).
# TORCHRUN: default torchrun. The remaining arguments go to python -m ddp_resnet.train.
set -euo pipefail
endpoint=${RDZV_ENDPOINT:-}
nnodes=${NNODES:-}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --endpoint=*) endpoint=${1#--endpoint=} ;;
        --nnodes=*) nnodes=${1#--nnodes=} ;;
        --) shift; break ;;
        *) break ;;
    esac
    shift
done
fail() { echo "elastic.sh: $*" >&2; exit 2; }
[[ -n "$endpoint" ]] || fail "set the rendezvous endpoint: --endpoint=HOST:PORT or RDZV_ENDPOINT"
[[ "$endpoint" =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):([0-9]{1,5})$ ]] \
    || fail "endpoint '$endpoint' is not HOST:PORT"
port=$((10#${BASH_REMATCH[2]}))
[[ "$port" -ge 1 && "$port" -le 65535 ]] || fail "endpoint port $port is outside 1-65535"
[[ -n "$nnodes" ]] || fail "set the node range: --nnodes=MIN:MAX or NNODES"
[[ "$nnodes" =~ ^([0-9]{1,6}):([0-9]{1,6})$ ]] || fail "nnodes '$nnodes' is not MIN:MAX (e.g. 2:4)"
min=$((10#${BASH_REMATCH[1]})) max=$((10#${BASH_REMATCH[2]}))
[[ "$min" -ge 1 && "$min" -le "$max" ]] || fail "nnodes $nnodes: need 1 <= MIN <= MAX"
run_id=${RUN_ID:-ddp_resnet}
[[ "$run_id" =~ ^[A-Za-z0-9._-]{1,128}$ ]] || fail "RUN_ID '$run_id' may hold only letters, digits, . _ -"
restarts=${MAX_RESTARTS:-10}
[[ "$restarts" =~ ^[0-9]{1,6}$ ]] || fail "MAX_RESTARTS '$restarts' is not a whole number"
conf=${RDZV_CONF:-}
[[ "$conf" =~ ^([A-Za-z_]+=[A-Za-z0-9._:-]+(,[A-Za-z_]+=[A-Za-z0-9._:-]+)*)?$ ]] \
    || fail "RDZV_CONF '$conf' is not key=value[,key=value...]"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC" -gt 0 ]] || fail "no GPU found; set NPROC"
fi
[[ "$NPROC" =~ ^[1-9][0-9]{0,3}$ ]] || fail "NPROC '$NPROC' is not a process count"
case " $* " in
    *" ckpt.every_steps="*) ;;
    *) echo "elastic.sh: note: no ckpt.every_steps given: a lost node costs every step since the last epoch end" >&2 ;;
esac
# torch's agents share the rendezvous store with their workers by default; a node that joins a running job then
# waits for a store address published only in the first round. Each round gets a store of its own with this:
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
args=(--nnodes="$min:$max" --nproc-per-node="$NPROC" --max-restarts="$restarts" --rdzv-backend=c10d
      --rdzv-endpoint="$endpoint" --rdzv-id="$run_id")
[[ -z "$conf" ]] || args+=(--rdzv-conf="$conf")
exec ${TORCHRUN:-torchrun} "${args[@]}" -m ddp_resnet.train "$@"
