"""Preemption: a signal on any rank stops every rank at the same step, after that step.

The handler only records the signal; the training loop asks :meth:`StopSignal.agreed` after each
step, which all-reduces (MAX) one flag across ranks every ``every`` steps -- one scalar all-reduce
outside the gradient reduction -- so a signal that reached a single rank (``kill`` of one process,
a node's agent) stops them all after the same step. The trainer then writes a checkpoint and the
process exits with :data:`PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``: "try again"): torchrun counts it
as a failure and restarts the workers (``--max-restarts``), ``launch/slurm.sbatch`` requeues the job.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["StopSignal", "PREEMPTED_EXIT", "maybe_inject_fault", "maybe_send_signal", "FAULT_ENV", "SIGNAL_ENV"]

PREEMPTED_EXIT = 75
log = logging.getLogger("dist_sam.train")

#: Testing aids, first attempt only: "rank:step" makes that rank SIGKILL itself after that step;
#: "rank:step:SIGNAL" makes it send itself SIGNAL when that step's batch is in hand (the step in
#: flight), "rank:step:SIGNAL:group" to its whole process group (data-loading workers too), as torchrun does.
FAULT_ENV = "DIST_SAM_FAULT_AT_STEP"
SIGNAL_ENV = "DIST_SAM_SIGNAL_AT_STEP"


def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def maybe_inject_fault(rank: int, step: int) -> None:
    """Testing aid (:data:`FAULT_ENV`): SIGKILL this process after ``step`` on ``rank``."""
    spec = os.environ.get(FAULT_ENV)
    if spec and _first_attempt() and spec == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_send_signal(rank: int, step: int) -> None:
    """Testing aid (:data:`SIGNAL_ENV`): send a signal while ``step`` is in flight on ``rank``."""
    spec = os.environ.get(SIGNAL_ENV, "").split(":")
    if len(spec) in (3, 4) and _first_attempt() and spec[:2] == [str(rank), str(step)]:
        if spec[3:] == ["group"]:
            os.killpg(os.getpgid(0), getattr(signal, spec[2]))
        else:
            os.kill(os.getpid(), getattr(signal, spec[2]))
class StopSignal:
    """Catch ``names`` (``["SIGTERM", "SIGUSR1"]``) and agree across ranks on when to stop.

    Args:
        names: signal names; empty leaves the default actions.
        every: all-reduce the flag every this many steps (``agreed`` is False in between).
        device: where the flag lives (the device of the backend: CUDA for NCCL).
    """

    def __init__(self, names: Sequence[str], every: int = 1, device: torch.device | str = "cpu") -> None:
        self.names, self.every, self.device = list(names), every, torch.device(device)
        self.received: str | None = None  # the first signal caught on this rank
        self.stop_signal: str | None = None  # the one every rank agreed on (a name, or "another rank's")
        self.checks = 0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignal":
        """Replace the handlers of ``names`` (main thread only); :meth:`uninstall` puts them back."""
        for name in self.names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
            signal.siginterrupt(number, False)  # restart interrupted system calls (collectives, file I/O)
        return self

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, _frame) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = name
            log.warning("caught %s: finishing the step in flight, then checkpointing and exiting", name)

    def agreed(self, step: int, force: bool = False) -> bool:
        """Whether every rank stops now (collective when ``step % every == 0`` or ``force``: call on all ranks)."""
        if step % self.every and not force:
            return False
        flag = 1.0 if self.received else 0.0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([flag], device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = float(tensor.item())
            self.checks += 1
        if flag > 0:
            self.stop_signal = self.received or "a signal on another rank"
        return flag > 0
