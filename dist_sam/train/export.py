"""``dist-sam export-checkpoint STEP_DIR OUT.pt``: a checkpoint's weights as one plain state dict.

Works for DDP and FSDP2 step directories (the latter through torch.distributed.checkpoint's
``dcp_to_torch_save``, no process group needed); the result loads with
``build_model(...).load_state_dict(torch.load(OUT.pt))`` for evaluation or DDP fine-tuning.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..checkpoint import CheckpointError
from .sharded import export_model_state

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dist-sam export-checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a step directory, e.g. runs/x/checkpoints/step_000000120")
    p.add_argument("out", help="where to write the plain state dict (.pt)")
    args = p.parse_args(argv)
    try:
        state = export_model_state(args.checkpoint)
    except CheckpointError as err:
        print(f"dist-sam export-checkpoint: {err}", file=sys.stderr)
        return 1
    tmp = f"{args.out}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(state)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
