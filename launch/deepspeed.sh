#!/usr/bin/env bash
# DeepSpeed ZeRO 0/1/2/3 training with SAM or RW-SAM, set by the "sam" section of the DeepSpeed JSON.
#
#   NUM_GPUS=8 launch/deepspeed.sh --config launch/configs/imagenet_resnet50_rwsam.yaml data.root=/data/imagenet
#   DS_CONFIG=launch/configs/ds_zero1_bf16.json launch/deepspeed.sh --config ...   # another ZeRO stage
#   HOSTFILE=hostfile NUM_NODES=2 launch/deepspeed.sh --config ...                  # several nodes (pdsh)
#   NUM_GPUS=2 DS_CONFIG=launch/configs/ds_demo_cpu.json launch/deepspeed.sh --config launch/configs/demo.yaml
#                                  # the demo on CPU: 2 processes, DeepSpeed's CPU accelerator (gloo)
#
# Configs: launch/configs/ds_zero0_fp32.json, ds_zero1_bf16.json, ds_zero2_bf16.json, ds_zero2_fp16.json,
# ds_zero3_fp32.json, ds_demo_cpu.json. Rerunning the same command resumes from the engine's
# checkpoint (checkpoint.resume=auto). `--deepspeed_config PATH` (or `--deepspeed PATH`) among the arguments
# overrides DS_CONFIG. Ranks come from the launcher's RANK/LOCAL_RANK/WORLD_SIZE, as under torchrun.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${PYTHON:=python}"
: "${NUM_GPUS:=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}"
if [[ "$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')" == 0 ]]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # DeepSpeed's CPU accelerator, gloo
fi
: "${DS_CONFIG:=$ROOT/launch/configs/ds_zero2_bf16.json}"
: "${MASTER_PORT:=29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

ARGS=()
while (($#)); do
    case "$1" in
        --deepspeed_config | --deepspeed) DS_CONFIG="$2"; shift 2 ;;
        --deepspeed_config=* | --deepspeed=*) DS_CONFIG="${1#*=}"; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
NODES=()
if [[ -n "${HOSTFILE:-}" ]]; then NODES=(--hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}"); fi

exec deepspeed ${NODES[@]+"${NODES[@]}"} --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --no_local_rank \
    "$ROOT/launch/train.py" --deepspeed "$DS_CONFIG" ${ARGS[@]+"${ARGS[@]}"}
