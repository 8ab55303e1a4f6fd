"""``launch/train.py --deepspeed ds.json``: the same run, stepped by :func:`dist_sam.deepspeed.initialize`.

The JSON's ``sam`` section drives the SAM step (the YAML's is used when the JSON has none);
``train_micro_batch_size_per_gpu`` must equal ``data.batch_size``. The base optimizer is the YAML's
(unless the JSON has an ``optimizer`` section) and the LR schedule is the YAML's warmup + cosine,
stepped by DeepSpeed. Checkpoints are DeepSpeed's (``engine.save_checkpoint``, every rank writes
its shards) with the training position and per-rank RNG states as client state.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, config_diff
from .config import RESUME_MAY_DIFFER, TrainConfig, to_dict
from .loop import Trainer
from .state import gather
from .steps import BASE_CLASSES, peak_lr

__all__ = ["DeepSpeedTrainer", "run_deepspeed", "deepspeed_config"]

log = logging.getLogger("dist_sam.train")
_TAG = "step_{:09d}"


def _import_module():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo)
    try:
        from .. import deepspeed as ds
    except ImportError as err:
        raise ImportError(f"--deepspeed needs DeepSpeed: pip install 'dist-sam[deepspeed]' ({err})") from err
    return ds


def deepspeed_config(cfg: TrainConfig, path: str) -> dict[str, Any]:
    """Read the DeepSpeed JSON and reconcile it with the YAML; every check runs before training.

    Raises:
        ValueError: naming the key: no ``sam`` section anywhere, a micro-batch other than
            ``data.batch_size``, fp16, or whatever :func:`dist_sam.deepspeed.check_config` refuses.
    """
    from ..deepspeed import check_config, load_config  # DeepSpeed itself is imported later

    config = dict(load_config(path))
    if "sam" not in config:
        if cfg.sam is None:
            raise ValueError(f"--deepspeed {path}: neither the DeepSpeed JSON nor the YAML has a sam section")
        config["sam"] = {k: v for k, v in to_dict(cfg)["sam"].items()}
    elif cfg.sam is not None and any(getattr(cfg.sam, k, v) != v for k, v in config["sam"].items()):
        log.warning("--deepspeed: the DeepSpeed JSON's sam section %s is used, not the YAML's", config["sam"])
    micro = config.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    if micro != cfg.data.batch_size:
        raise ValueError(f"--deepspeed {path}: train_micro_batch_size_per_gpu={micro} differs from data.batch_size="
                         f"{cfg.data.batch_size}; make them equal")
    if cfg.optim.accumulation_steps != 1:
        raise ValueError(f"--deepspeed {path}: optim.accumulation_steps={cfg.optim.accumulation_steps} is not used "
                         "under DeepSpeed; leave it at 1 (the JSON's gradient_accumulation_steps is DeepSpeed's)")
    config.pop("train_batch_size", None)  # derived from the micro-batch and the world size
    config.setdefault("gradient_accumulation_steps", 1)
    if cfg.optim.clip_grad_norm is not None:
        config.setdefault("gradient_clipping", cfg.optim.clip_grad_norm)
    if cfg.run.precision == "bf16":
        config.setdefault("bf16", {"enabled": True})
    elif cfg.run.precision == "fp16":
        raise ValueError("run.precision: fp16 is not supported by the trainer under --deepspeed; use bf16 or fp32 "
                         '(dist_sam.deepspeed.initialize accepts "fp16": {"enabled": true} directly)')
    if (config.get("zero_optimization") or {}).get("stage", 0) == 3:
        raise ValueError(f"--deepspeed {path}: zero_optimization.stage=3 is not supported by the trainer (its "
                         "model.pt and replica digests need whole parameters); accepted: 0, 1, 2, or "
                         "dist_sam.deepspeed.initialize directly for ZeRO-3")
    check_config(config)
    return config


class DeepSpeedTrainer(Trainer):
    """:class:`Trainer` with a DeepSpeed engine in place of DDP (ZeRO 0/1/2, bf16 or fp32)."""

    guarded = False  # the engine's optimizer is DeepSpeed's; it skips and counts non-finite steps itself

    def __init__(self, cfg: TrainConfig, env, ds_config: dict[str, Any]) -> None:
        if cfg.model.compile:
            raise ValueError("model.compile=true is not supported with the DeepSpeed trainer (its engine wraps the "
                             "module); train with DDP (no deepspeed config) or set model.compile=false")
        self.ds_config = ds_config
        super().__init__(cfg, env)

    def find_checkpoint(self) -> tuple[None, None]:
        return None, None  # DeepSpeed's own checkpoints, loaded by :meth:`resume` once the engine exists

    def setup(self, model: nn.Module) -> None:
        config = self.ds_config
        base = None
        if "optimizer" not in config:
            base = BASE_CLASSES[self.cfg.optim.base](model.parameters(), lr=peak_lr(self.cfg, self.env.world_size),
                                                     **self.cfg.optim.base_kwargs())
        engine, optimizer, _, scheduler = _import_module().initialize(
            model=model, config=config, optimizer=base, lr_scheduler=self.build_scheduler, loss_fn=self.loss_fn)
        self.model = self.engine = engine
        self.module = engine.module
        self.optimizer, self.scheduler = optimizer, scheduler

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.engine.train_step((images, labels))  # DeepSpeed steps the LR schedule itself

    def rank_state(self) -> dict[str, Any]:
        return {"rng": super().rank_state()["rng"], "optimizer": {}}

    def save(self) -> None:
        """``engine.save_checkpoint`` (every rank writes its shards), position as client state."""
        with self.timer("checkpoint"):
            per_rank = gather(self.rank_state())
            directory = self.cfg.checkpoint_dir
            self.engine.save_checkpoint(directory, tag=_TAG.format(self.global_step),
                                        client_state={"position": {**self.position(), "per_rank": per_rank}})
            if self.primary:
                tags = sorted(t for t in os.listdir(directory) if t.startswith("step_"))
                for old in tags[:-self.cfg.checkpoint.keep_last]:
                    shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
        self.saved_at = self.global_step

    def resume(self) -> None:
        choice = self.cfg.checkpoint.resume
        if choice == "never" or not os.path.isfile(os.path.join(self.cfg.checkpoint_dir, "latest")):
            if choice not in ("never", "auto"):
                raise ValueError(f"checkpoint.resume={choice!r}: under --deepspeed use 'auto' or 'never' "
                                 f"(checkpoints are DeepSpeed tags in checkpoint.dir)")
            return
        path, client = self.engine.load_checkpoint(self.cfg.checkpoint_dir)
        state = client["position"]
        diff = config_diff(state["config"], to_dict(self.cfg), RESUME_MAY_DIFFER)
        if diff:
            raise CheckpointError(f"refusing checkpoint {path}: it was written with a different config "
                                  f"({'; '.join(diff[:5])})")
        self.check_world_size(state, path)
        self.restore_position(state, state["per_rank"][self.env.rank], path)


def run_deepspeed(cfg: TrainConfig, env, ds_config: dict[str, Any]) -> dict[str, Any]:
    """Train with DeepSpeed; the same outputs as the DDP path (comm bytes are not counted)."""
    trainer = DeepSpeedTrainer(cfg, env, ds_config)
    summary = trainer.run()
    trainer.write_outputs(summary)
    return summary
