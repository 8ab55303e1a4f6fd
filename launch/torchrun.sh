#!/usr/bin/env bash
# Multi-node training with torchrun and c10d rendezvous; run the same line on every node.
#
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 launch/torchrun.sh \
#       --config launch/configs/imagenet_resnet50_rwsam.yaml data.root=/data/imagenet
#
# NODE_RANK is advisory under c10d (torchrun may assign node ranks in arrival order, and again after
# a restart); training does not depend on it: checkpoints are rank-independent. --max-restarts
# restarts every worker when one fails; they resume from the latest checkpoint that loads
# (checkpoint.dir must be on storage all nodes share), at any world size that keeps the global batch.
# A worker sent SIGTERM or SIGUSR1 finishes its step; all workers agree to stop, write a checkpoint
# and exit with status 75, which torchrun restarts like a failure (one of --max-restarts). SIGTERM
# to torchrun itself is forwarded to the workers; it waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# for that checkpoint before SIGKILL, then exits (the scheduler restarts the job).
# Faults stop every worker, named, with a failure status of their own: 74 a checkpoint write failed
# (the previous checkpoints stay; a restart resumes from the newest), 69 a collective waited longer
# than run.collective_timeout_s (--collective-timeout-s) for a peer or lost it, 65 run.max_skipped_steps
# non-finite steps in a row. torchrun restarts them like any failure, up to --max-restarts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${NPROC_PER_NODE:=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
: "${RDZV_ENDPOINT:=127.0.0.1:29400}"
: "${RUN_ID:=dist-sam}"
: "${MAX_RESTARTS:=3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}"

exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RUN_ID" --max-restarts="$MAX_RESTARTS" \
    "$ROOT/launch/train.py" "$@"
