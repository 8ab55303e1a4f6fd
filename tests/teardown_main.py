"""``launch/train.py`` with a look at this process's native threads after ``main()`` returns.

Each rank writes ``$TEARDOWN_OUT/rank<R>.json``: the thread names (``/proc/self/task/*/comm``) alive
once the trainer has released everything, just before the interpreter's finalization. With
``TEARDOWN_BARE=1`` the trainer's :func:`shutdown_distributed` is replaced by a bare
``destroy_process_group`` (the control: the old teardown).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from dist_sam.train import cli  # noqa: E402

if os.environ.get("TEARDOWN_BARE") == "1":
    cli.shutdown_distributed = lambda: dist.destroy_process_group() if dist.is_initialized() else None

if __name__ == "__main__":
    status = cli.main()
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    with open(os.path.join(os.environ["TEARDOWN_OUT"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
        json.dump({"status": status, "threads": names}, fh)
    sys.exit(status)
