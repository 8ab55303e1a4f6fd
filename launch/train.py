"""Train an image classifier with SAM, RW-SAM or SGD, data-parallel. A thin wrapper over
``dist_sam.train.cli:main`` (the same as ``dist-sam train``).

Single process:
    python launch/train.py --config launch/configs/demo.yaml
One node, 2 processes (the demo):
    torchrun --standalone --nproc_per_node=2 launch/train.py --config launch/configs/demo.yaml
Several nodes (on each node; see launch/torchrun.sh):
    torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=$RDZV_ENDPOINT --rdzv_id=$RUN_ID --max-restarts=3 \
        launch/train.py --config launch/configs/imagenet_resnet50_rwsam.yaml data.root=/data/imagenet
MPI (mpi4py bootstrap; see launch/mpirun.sh):
    mpirun -np 16 python launch/train.py --launcher mpi --config launch/configs/imagenet_resnet50_sam.yaml
SLURM: sbatch launch/slurm.sbatch; DeepSpeed: launch/deepspeed.sh (adds --deepspeed ds_config.json).
Overrides: any `section.key=value`, e.g. `optim.lr=0.1 sam.rho=0.1 run.epochs=10`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout without `pip install -e`

from dist_sam.train.cli import main  # noqa: E402

if __name__ == "__main__":
    status = main()
    sys.exit(status)
