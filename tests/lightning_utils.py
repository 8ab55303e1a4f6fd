"""Shared pieces of the Lightning integration tests: a tiny CNN as a SAMMixin module, a plain
manual-optimization module, per-rank data, a Trainer factory and the DDP ``sam_step`` reference."""

from __future__ import annotations

import copy

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from dist_sam import sam_step
from dist_sam.config import SamConfig
from dist_sam.distributed.ddp import CommCounter
from dist_sam.integrations.lightning import SAMMixin
from dist_utils import CollectiveCounts
from reference import make_batch, make_cnn

BASE = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
B = 8  # samples per rank per step


def per_sample_ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def rank_data(rank: int, steps: int):
    """This rank's batches, steps * B samples, in order (no sampler: the reference sees the same)."""
    return make_batch("cnn", steps * B, seed=100 + rank, dtype=torch.float32)


def loader(rank: int, steps: int) -> DataLoader:
    return DataLoader(TensorDataset(*rank_data(rank, steps)), batch_size=B, shuffle=False)


class Net(SAMMixin, L.LightningModule):
    """The tiny CNN of tests/reference.py. ``count=True``: DDP's gradient all-reduces per step, as
    ``(calls, bytes)``; ``count=<a dist_utils.CollectiveCounts>``: every collective of each step."""

    def __init__(self, count=False, **sam_options):
        super().__init__(**sam_options)
        self.net = make_cnn(0, dtype=torch.float32)
        self.count, self.counter, self.step_bytes = count, None, []

    def forward(self, x):
        return self.net(x)

    def per_sample_loss(self, outputs, targets):
        return per_sample_ce(outputs, targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), **BASE)

    def on_train_start(self):
        super().on_train_start()
        self.sam_at_start = copy.deepcopy(self.sam_optimizer.state_dict())  # as loaded, on a resume
        if self.count is True:
            self.counter = CommCounter.attach(self.trainer.strategy.model)

    def on_train_batch_start(self, *args):
        if isinstance(self.count, CollectiveCounts):
            self.count.active = {}

    def on_train_batch_end(self, *args):
        if isinstance(self.count, CollectiveCounts):
            self.step_bytes.append(self.count.active)
            self.count.active = None
        elif self.counter is not None:
            self.step_bytes.append((self.counter.calls, self.counter.bytes))
            self.counter.reset()


class PlainNet(Net):
    """Lightning's own manual-optimization step (mean loss, manual_backward, opt.step): the
    collectives a SAM step must match."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(per_sample_ce(self(x), y).mean())
        opt.step()


def trainer(strategy="ddp", precision="32-true", max_steps=3, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                     precision=precision, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     num_sanity_val_steps=0, **kwargs)


def reference(rank: int, steps: int, sam: dict, *, accumulation_steps=1, clip_grad_norm=None, dtype=None):
    """dist-sam's own sam_step under plain DDP on the same batches: (params, buffers, bytes per step)."""
    ddp = DDP(make_cnn(0, dtype=torch.float32))
    opt = SamConfig.from_dict(sam).build_optimizer(ddp.parameters(), base="sgd", **BASE)
    counter, step_bytes = CommCounter.attach(ddp), []
    x, y = rank_data(rank, steps)
    for i in range(steps):
        sl = slice(i * B, (i + 1) * B)
        sam_step(ddp, opt, per_sample_ce, x[sl], y[sl], accumulation_steps=accumulation_steps,
                 clip_grad_norm=clip_grad_norm, autocast_dtype=dtype, **SamConfig.from_dict(sam).step_kwargs())
        step_bytes.append((counter.calls, counter.bytes))
        counter.reset()
    return state(ddp.module), step_bytes


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, detached copies, by name within the CNN."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class CPUDeepSpeedStrategy(L.strategies.DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with only its CUDA gate lifted, to run ZeRO on CPU (DS_ACCELERATOR=cpu).

    Lightning 2.6.6 refuses anything but a ``CUDAAccelerator`` in ``setup_environment`` and checks
    that device indices are the local ranks (``_validate_device_index_selection``; it passes
    ``root_device.index`` to DeepSpeed as ``device_rank``), which CPU devices (index ``None``) fail.
    DeepSpeed itself runs on CPU with gloo; the CPU devices get their local ranks as indices.
    """

    def setup_environment(self) -> None:
        super(L.strategies.DeepSpeedStrategy, self).setup_environment()  # DDPStrategy's: no CUDA gate

    @property
    def parallel_devices(self):
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices) -> None:
        self._parallel_devices = None if devices is None else [torch.device("cpu", i) for i in range(len(devices))]
