#!/usr/bin/env bash
# Training under mpirun/mpiexec: MPI starts the ranks, the mpi4py bootstrap (--launcher mpi)
# broadcasts rank 0's address and a free port and sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE.
#
#   NP=16 MPI_ARGS="--hostfile hosts --map-by ppr:8:node -x OMP_NUM_THREADS" launch/mpirun.sh \
#       --config launch/configs/imagenet_resnet50_sam.yaml data.root=/data/imagenet
#
# MPI_ARGS passes launcher options through (OpenMPI: --hostfile, -x VAR; MPICH: -f hosts, -genvall).
# Set MASTER_PORT to pin the port (firewalls); otherwise rank 0 picks a free one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${NP:=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
: "${MPIRUN:=mpirun}"
: "${MPI_ARGS:=}"
: "${PYTHON:=python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

# shellcheck disable=SC2086  # MPI_ARGS is a list of options
exec "$MPIRUN" -np "$NP" $MPI_ARGS "$PYTHON" "$ROOT/launch/train.py" --launcher mpi "$@"
