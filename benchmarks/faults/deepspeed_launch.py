"""``launch/deepspeed.sh`` N times in a row on CPU, counting failures (the teardown abort, issue 20).

    python -m benchmarks.faults.deepspeed_launch --runs 10 --out benchmarks/results/deepspeed_launch.json

Each run is the DeepSpeed launcher with 2 processes on DeepSpeed's CPU accelerator (gloo), the
``sam`` section of ``launch/configs/ds_demo_cpu.json`` (ZeRO-2, RW-SAM), one epoch of a tiny
synthetic dataset (7 steps, checkpoints every 2 steps and at the end of the epoch), as
``tests/test_deepspeed_launcher.py`` runs it once. A run fails if its exit status is not 0 (250 is
the launcher's report of a worker's SIGABRT: "terminate called without an active exception").
Every run goes through the interpreter's full teardown (``launch/train.py`` has no ``os._exit``
since DeepSpeed is imported before the default group, :func:`dist_sam.train.ds.import_deepspeed`).
The JSON holds every run's status and wall time and the end of each failing run's output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

from ..common.procs import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "deepspeed.sh")
DS_CONFIG = os.path.join(ROOT, "launch", "configs", "ds_demo_cpu.json")


def _config(work: str, run: int) -> str:
    tree = {"run": {"output_dir": os.path.join(work, f"run{run}"), "seed": 0, "epochs": 1, "deterministic": True,
                    "progress": False, "tensorboard": False},
            "model": {"name": "small_cnn"}, "optim": {"lr": 0.05},
            "sam": {"variant": "rwsam", "ascent": "local", "rho": 0.05, "lam": 0.5, "mu": "auto"},
            "data": {"root": os.path.join(work, "data"), "backend": "torchvision", "device": "cpu", "image_size": 16,
                     "batch_size": 8, "num_workers": 0, "validate_files": False},
            "checkpoint": {"every_steps": 2, "keep_last": 2}}
    path = os.path.join(work, f"run{run}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(tree, fh)
    return path


def launch(config: str, timeout: float) -> tuple[int, float, str]:
    """One ``launch/deepspeed.sh`` run: ``(exit status, wall seconds, output tail)``."""
    env = {**os.environ, "NUM_GPUS": "2", "DS_CONFIG": DS_CONFIG, "PYTHON": sys.executable,
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("DS_ACCELERATOR", None)
    # The launcher's workers run under the launcher's own interpreter path, so the JIT-built comm op
    # gets other include paths than a test's: a cache of its own spares each side a rebuild.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                                        "dist_sam_launcher"))
    start = time.perf_counter()
    try:
        done = subprocess.run(["bash", SCRIPT, "--config", config], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        status, output = done.returncode, done.stdout[-2000:] + done.stderr[-4000:]
    except subprocess.TimeoutExpired as err:
        status, output = -1, f"timed out after {timeout:.0f} s: {str(err.stderr)[-4000:]}"
    return status, time.perf_counter() - start, output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--out", default=None, help="JSON results (default: print only)")
    args = p.parse_args(argv)
    from dist_sam.data.demo import make_synthetic

    runs = []
    with tempfile.TemporaryDirectory(prefix="ds_launch_") as work:
        make_synthetic(os.path.join(work, "data"), 100, image_size=16)  # 10 val images: every class
        for i in range(args.runs):
            status, seconds, output = launch(_config(work, i), args.timeout)
            runs.append({"run": i, "status": status, "seconds": round(seconds, 1),
                         **({"output_tail": output} if status != 0 else {})})
            print(f"run {i + 1}/{args.runs}: exit {status} in {seconds:.0f} s", flush=True)
    failures = sum(r["status"] != 0 for r in runs)
    result = {"runs": args.runs, "failures": failures, "per_run": runs}
    print(f"{failures} failure(s) in {args.runs} runs of launch/deepspeed.sh", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
