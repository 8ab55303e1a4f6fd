"""``launch/train.py --deepspeed ds.json``: the same run, stepped by :func:`dist_sam.deepspeed.initialize`.

The JSON's ``sam`` section drives the SAM step (the YAML's is used when the JSON has none);
``train_micro_batch_size_per_gpu`` must equal ``data.batch_size``. The base optimizer is the YAML's
(unless the JSON has an ``optimizer`` section) and the LR schedule is the YAML's warmup + cosine,
stepped by DeepSpeed. Checkpoints are DeepSpeed's (``engine.save_checkpoint``, every rank writes
its shards) with the training position and per-rank RNG states as client state.

A step is one optimizer step of the batch plan (:mod:`.plan`): the loader hands each worker
``micro * gradient_accumulation_steps`` samples, fed to the engine one micro-batch at a time, so a
resume at another world size keeps the global batch and ``m`` as the DDP trainer does
(:mod:`.ds_resize`: ZeRO-0 fp32 as saved, ZeRO-1/2/3 through DeepSpeed's universal checkpoint).

Under ZeRO-3 the module's parameters are partitioned: evaluation runs through DeepSpeed's gather
hooks, and ``model.pt`` and the replica digests take the whole parameters gathered on every rank
(:meth:`DeepSpeedTrainer.whole_state`).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, config_diff
from ..distributed.launch import shutdown_distributed
from ..optim.rwsam import RWSAM
from .config import RESUME_MAY_DIFFER, TrainConfig, to_dict
from .ds_resize import check_resizable, read_tag, resize_config, to_universal
from .loop import Trainer
from .plan import BatchPlan, replan
from .state import gather
from .steps import BASE_CLASSES, peak_lr

__all__ = ["DeepSpeedTrainer", "run_deepspeed", "deepspeed_config", "import_deepspeed", "release_process_groups"]

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


def import_deepspeed() -> None:
    """Import DeepSpeed before the default process group exists (``launch/train.py --deepspeed``).

    DeepSpeed 0.19.8's ``TorchBackend.barrier`` and ``monitored_barrier``
    (``deepspeed/comm/torch.py:516`` and ``:522``) take ``group=torch.distributed.GroupMember.WORLD``
    as a default argument, evaluated once, when ``deepspeed.comm.torch`` is first imported. Imported
    after ``init_process_group`` (as this trainer did, DeepSpeed being imported lazily), those two
    functions' ``__defaults__`` keep the world ProcessGroup object for the life of the interpreter:
    ``destroy_process_group`` empties ``_world`` but cannot reach them, so the world group's
    ProcessGroupGloo (its ``gloo_tcp_loop`` and two ``pt_gloo_runloop`` threads) and, through its
    store, rank 0's TCPStore server (``pt_tcpstore_uv``) lived into the interpreter's teardown, where
    a joinable C++ thread aborted it (issue 20). The defaults tuple holds no GC-tracked object, so
    ``gc.get_referrers`` does not list it. Imported first, the defaults are ``None``, which both
    functions replace with the current world group when called: the same behaviour, no reference.

    Raises:
        ImportError: DeepSpeed (or its dist_sam adapter) is not installed.
    """
    _import_module()
    import deepspeed.comm.torch  # noqa: F401  (the class body that reads GroupMember.WORLD)


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
    check_config(config)
    return config


class DeepSpeedTrainer(Trainer):
    """:class:`Trainer` with a DeepSpeed engine in place of DDP (ZeRO 0-3, bf16 or fp32)."""

    guarded = False  # the engine's optimizer is DeepSpeed's; it skips and counts non-finite steps itself

    def __init__(self, cfg: TrainConfig, env, ds_config: dict[str, Any]) -> None:
        if cfg.model.compile:
            raise ValueError("model.compile=true is not supported with the DeepSpeed trainer (its engine wraps the "
                             "module); train with DDP (no deepspeed config) or set model.compile=false")
        self.ds_config = ds_config
        super().__init__(cfg, env)

    def find_checkpoint(self) -> tuple[str | None, dict[str, Any] | None]:
        """The newest DeepSpeed tag and its saved position (with SAM's per-rank state), checked
        against the config before any engine exists; loaded into the engine by :meth:`resume`."""
        choice = self.cfg.checkpoint.resume
        if choice not in ("never", "auto"):
            raise ValueError(f"checkpoint.resume={choice!r}: under --deepspeed use 'auto' or 'never' "
                             f"(checkpoints are DeepSpeed tags in checkpoint.dir)")
        path, saved = read_tag(self.cfg.checkpoint_dir) if choice == "auto" else (None, None)
        if saved is None:
            return None, None
        state = {**saved["position"], "sam_per_rank": (saved.get("dist_sam") or {}).get("per_rank")}
        diff = config_diff(state["config"], to_dict(self.cfg), RESUME_MAY_DIFFER)
        if diff:
            raise CheckpointError(f"refusing checkpoint {path}: it was written with a different config "
                                  f"({'; '.join(diff[:5])})")
        return path, state

    def batch_plan(self, state: dict[str, Any] | None) -> BatchPlan:
        """``micro * gradient_accumulation_steps`` per worker; on resume the saved plan, re-planned to
        this world size, with the engine's micro-batch and accumulation set to it."""
        micro, k = self.ds_config["train_micro_batch_size_per_gpu"], self.ds_config["gradient_accumulation_steps"]
        fresh = BatchPlan(self.env.world_size, micro * k, k)
        if state is None:
            return fresh
        saved = BatchPlan.from_dict(state["plan"])
        plan = replan(saved, self.env.world_size, self.cfg, self.resumed_from)
        if saved.world_size != plan.world_size:
            base = (self.ds_config.get("optimizer") or {}).get("type", self.cfg.optim.base)
            check_resizable(self.ds_config, base, saved.world_size, plan.world_size, self.resumed_from)
        if plan != fresh:
            self.ds_config = resize_config(self.ds_config, plan.chunk, plan.accumulation_steps,
                                           universal=saved.world_size != plan.world_size)
            _import_module().check_config(self.ds_config)  # e.g. LookSAM refuses accumulation
        return plan

    def setup(self, model: nn.Module) -> None:
        config = self.ds_config
        base = None
        if "optimizer" not in config:
            base = BASE_CLASSES[self.cfg.optim.base](
                model.parameters(), lr=peak_lr(self.cfg, self.env.world_size, self.plan.global_batch),
                **self.cfg.optim.base_kwargs())
        engine, optimizer, _, scheduler = _import_module().initialize(
            model=model, config=config, optimizer=base, lr_scheduler=self.build_scheduler, loss_fn=self.loss_fn)
        self.model = self.engine = engine
        self.module = engine.module
        self.optimizer, self.scheduler = optimizer, scheduler
        if isinstance(engine.sam, RWSAM):  # directions per global ascent group: the same at any world size
            engine.sam.groups_per_rank = self.plan.groups_per_rank(self.cfg)

    def whole_state(self) -> dict[str, torch.Tensor]:
        """ZeRO-3: the whole parameters, gathered on every rank (a collective) and copied out.

        ``GatheredParameters`` all-gathers the partitions the module computes with: in fp32 they
        are the optimizer's fp32 master partitions bit for bit (stage 3 copies them into the
        parameters after each step), and in bf16 the bf16 weights, as ZeRO-1/2's ``model.pt``. The
        16-bit consolidated state dict would hand the weights to rank 0 only (no digest elsewhere).
        """
        if self.engine.zero_optimization_stage() != 3:
            return super().whole_state()
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The plan's micro-batches in turn; DeepSpeed steps (and the LR schedule) at the last."""
        micro = self.plan.chunk
        losses = [self.engine.train_step((x, y)) for x, y in zip(images.split(micro), labels.split(micro))]
        return torch.stack(losses).mean()

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
        """Load the tag :meth:`find_checkpoint` chose into the engine; after a change of world size
        its universal copy (ZeRO-1/2/3), and each ascent group's RW-SAM ``mu`` from the rank that read it."""
        state, self._loaded = self._loaded, None
        if state is None:
            return
        path, saved, rank = self.resumed_from, BatchPlan.from_dict(state["plan"]), self.env.rank
        resized = saved.world_size != self.plan.world_size
        load_dir, tag = (to_universal(path, self.ds_config, self.primary, state["global_step"]) if resized
                         else os.path.split(path))
        self.engine.load_checkpoint(load_dir, tag=tag)  # SAM's state: this rank's, or rank 0's if resized
        mine = state["per_rank"][rank] if rank < saved.world_size else None
        if resized:
            if state["sam_per_rank"]:
                self._carry_mu({"per_rank": [{"optimizer": s} for s in state["sam_per_rank"]]}, saved,
                               self.engine.sam)
            self._log_replan(saved, mine is None)
        self.restore_position(state, mine, path)


    def close(self) -> None:
        """Release the engine: ``engine.destroy()`` removes ZeRO's gradient hooks, which otherwise
        keep the engine, its process groups and their gloo threads alive past the interpreter's
        teardown (the cause of an abort at exit; see :func:`release_process_groups`)."""
        engine, self.model = getattr(self, "engine", None), None
        self.engine = self.module = self.optimizer = self.scheduler = None
        if engine is not None:
            engine.destroy()


def release_process_groups() -> None:
    """Destroy every process group, DeepSpeed's references included, while the interpreter still runs.

    ``torch.distributed.destroy_process_group`` alone left two gloo groups (their
    ``gloo_tcp_loop`` and ``pt_gloo_runloop`` threads) and, on rank 0, the TCPStore server
    (``pt_tcpstore_uv``) running into the interpreter's teardown: ZeRO's gradient hooks held the
    engine (:meth:`DeepSpeedTrainer.close`) and ``deepspeed.utils.groups`` its world group, which
    ``deepspeed.comm.destroy_process_group`` releases. The default group itself is released only if
    DeepSpeed was imported before it was created (:func:`import_deepspeed`).
    """
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")  # None: the run stopped before DeepSpeed was imported
    if torch.distributed.is_initialized():
        if comm is not None and comm.cdb is not None:
            comm.destroy_process_group()  # torch's, then deepspeed.utils.groups' references
    shutdown_distributed()  # the rest, and the engine's reference cycles with the groups they hold


def run_deepspeed(cfg: TrainConfig, env, ds_config: dict[str, Any]) -> dict[str, Any]:
    """Train with DeepSpeed; the same outputs as the DDP path (comm bytes are not counted). The
    engine is released afterwards, also on failure; the caller then calls :func:`release_process_groups`."""
    trainer = DeepSpeedTrainer(cfg, env, ds_config)
    try:
        summary = trainer.run()
        trainer.write_outputs(summary)
    finally:
        trainer.close()
    return summary
