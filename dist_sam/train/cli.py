"""``dist-sam train`` / ``python launch/train.py``: config in, trained model and ``summary.json`` out.

    python launch/train.py --config launch/configs/demo.yaml [section.key=value ...]
        [--launcher env|mpi] [--deepspeed ds_config.json] [--collective-timeout-s S] [--print-config]

The config is read and validated (every section, every key) before any process group, file or
model is touched; a bad value exits with status 2 and a message naming the key, as does a
checkpoint that must not be resumed from. A run stopped by a signal (``checkpoint.signals``)
exits with status 75 after writing its checkpoint: torchrun restarts, ``launch/slurm.sbatch`` requeues.
Faults are failures, named on every rank (:mod:`dist_sam.train.faults`): a failed checkpoint write
exits 74, a collective that timed out (``run.collective_timeout_s``) or lost its peer 69,
``run.max_skipped_steps`` non-finite steps in a row 65.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoint import CheckpointError, CheckpointWriteError
from ..data import DatasetLayoutError
from ..distributed.env import discover
from ..distributed.launch import LAUNCHERS, init_distributed, shutdown_distributed
from .config import dump_yaml, load_config
from .faults import CollectiveError, NonFiniteError, exit_status
from .preempt import PREEMPTED_EXIT

__all__ = ["main", "build_parser"]

log = logging.getLogger("dist_sam.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sam train", description="Data-parallel training with SAM, RW-SAM or SGD.")
    p.add_argument("--config", "-c", required=True, help="YAML config (see launch/configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values (YAML-parsed)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="env",
                   help="env: torchrun or srun variables (default); mpi: mpi4py bootstrap under mpirun/mpiexec")
    p.add_argument("--deepspeed", metavar="JSON", default=None, help="train through dist_sam.deepspeed with this DeepSpeed config")
    p.add_argument("--collective-timeout-s", type=float, default=None, metavar="S",
                   help="seconds a collective waits for a peer (run.collective_timeout_s, default 600)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, join the process group, train, write the outputs; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.collective_timeout_s is not None:
            overrides.append(f"run.collective_timeout_s={args.collective_timeout_s!r}")
        cfg = load_config(args.config, overrides)
        ds_config = None
        if args.deepspeed is not None:
            from .ds import deepspeed_config

            ds_config = deepspeed_config(cfg, args.deepspeed)
    except (ValueError, OSError) as err:
        print(f"dist-sam train: config error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # --deepspeed without dist_sam.deepspeed or DeepSpeed
        print(f"dist-sam train: --deepspeed needs DeepSpeed support: pip install 'dist-sam[deepspeed]' ({err})",
              file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    _setup_logging(discover().rank)
    if ds_config is not None:
        from .ds import import_deepspeed

        try:
            import_deepspeed()  # before the default group: else DeepSpeed keeps it alive to exit
        except ImportError as err:
            print(f"dist-sam train: --deepspeed needs DeepSpeed support: pip install 'dist-sam[deepspeed]' ({err})",
                  file=sys.stderr)
            return 2
    env = init_distributed(args.launcher, timeout_s=cfg.run.collective_timeout_s, always=args.deepspeed is not None)
    logging.getLogger().setLevel(logging.INFO if env.rank == 0 else logging.WARNING)
    try:
        summary = _train(cfg, env, ds_config)  # the trainer is gone on return: nothing holds a group
        if env.rank == 0:
            _report(cfg.run.output_dir, summary)
    except (CheckpointError, DatasetLayoutError) as err:  # every rank refuses alike, before training
        print(f"dist-sam train: {err}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, CollectiveError, NonFiniteError) as err:  # every rank stops alike, named
        print(f"dist-sam train: rank {env.rank}: {err}", file=sys.stderr, flush=True)
        return exit_status(err)
    finally:
        if ds_config is not None:
            from .ds import release_process_groups

            release_process_groups()  # DeepSpeed's groups too: nothing of them left running at exit
        else:
            shutdown_distributed()  # no group thread left to meet the interpreter's finalization
    return PREEMPTED_EXIT if summary.get("preempted") else 0


def _train(cfg, env, ds_config: dict | None) -> dict:
    """Train; the summary. The trainer (and the model and groups it holds) lives only in here, so
    :func:`shutdown_distributed` afterwards finds nothing left holding a process group."""
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        if ds_config is not None:
            from .ds import run_deepspeed

            return run_deepspeed(cfg, env, ds_config)
        from .loop import Trainer

        trainer = Trainer(cfg, env)
        summary = trainer.run()
        trainer.write_outputs(summary)
        return summary


def _report(output_dir: str, summary: dict) -> None:
    state = "finished" if summary.get("finished") else f"stopped at step {summary.get('global_step')} (resumable)"
    if summary.get("preempted"):
        state += f" on {summary.get('stop_signal')}"
    top1 = summary.get("top1")
    acc = f", val top-1 {top1:.2f}%" if top1 is not None else ""
    log.info("%s%s, %.0f img/s", state, acc, summary.get("images_per_second") or 0.0)
    names = [n + ("/" if os.path.isdir(os.path.join(output_dir, n)) else "") for n in sorted(os.listdir(output_dir))]
    print(f"outputs in {os.path.abspath(output_dir)}: {', '.join(names)}", flush=True)
