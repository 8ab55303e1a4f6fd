"""``make demo`` / ``dist-sam demo``: the first thing to run.

Writes the digits dataset if it is missing (``data/digits`` under the repository, or
``--data-dir``), then runs, from the repository root::

    torchrun --standalone --nproc_per_node=2 launch/train.py --config launch/configs/demo.yaml

RW-SAM with device-local ascent, DALI on the CPU, two processes. Extra ``section.key=value``
arguments are passed on to ``launch/train.py`` (e.g. ``run.epochs=2``); the demo adds
``checkpoint.resume=never`` so that running it again trains again. Prints where the outputs are.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

__all__ = ["main", "repo_root", "DEMO_CONFIG"]

DEMO_CONFIG = os.path.join("launch", "configs", "demo.yaml")


def repo_root() -> str:
    """The checkout holding ``launch/`` (the demo runs from a clone, ``pip install -e``)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(root, DEMO_CONFIG)):
        raise FileNotFoundError(f"{DEMO_CONFIG} not found under {root}: run the demo from a git clone of dist-sam")
    return root


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sam demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="the digits dataset (written if missing; default <repo>/data/digits)")
    p.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="passed on to launch/train.py")
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the demo data if needed, train under torchrun, print where the outputs are."""
    args = _parser().parse_args(argv)
    root = repo_root()
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else os.path.join(root, "data", "digits")
    overrides = list(args.overrides) + ([f"data.root={data_dir}"] if args.data_dir else [])
    if not any(o.startswith("checkpoint.resume=") for o in overrides):
        overrides.append("checkpoint.resume=never")  # `make demo` again trains again (it does not resume)
    from .config import load_config

    try:  # validate before anything is written or started
        cfg = load_config(os.path.join(root, DEMO_CONFIG), overrides)
    except ValueError as err:
        print(f"dist-sam demo: config error: {err}", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(data_dir, "train")):
        from ..data.demo import make_digits

        print(f"writing the digits dataset to {data_dir} (once)", flush=True)
        make_digits(data_dir)
    cmd = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", "launch/train.py", "--config", DEMO_CONFIG, *overrides]
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    run = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]  # the same torchrun, this interpreter
    status = subprocess.call(run, cwd=root, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    out = os.path.join(root, cfg.run.output_dir) if not os.path.isabs(cfg.run.output_dir) else cfg.run.output_dir
    if status != 0:
        print(f"dist-sam demo: training failed (exit status {status})", file=sys.stderr)
        return status
    print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {out}:\n"
          f"  summary.json  accuracy, img/s, step-time breakdown, comm bytes/step, resolved config\n"
          f"  model.pt      final weights      config.yaml  resolved config\n"
          f"  checkpoints/  resumable state    tensorboard/ tensorboard --logdir {os.path.join(out, 'tensorboard')}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
