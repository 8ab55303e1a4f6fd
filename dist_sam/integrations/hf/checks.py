"""What :class:`~dist_sam.integrations.hf.SAMTrainer` refuses, before training starts (ValueError naming it)."""

from __future__ import annotations

from typing import Any

__all__ = ["check_supported", "ASCENTS"]

#: Ascent modes a Trainer step can run: ``global`` needs a synchronized ascent inside Trainer's
#: ``no_sync`` window, ``full`` (n-SAM) a pass over the dataset; both stay with ``dist_sam.sam_step``.
ASCENTS = ("local", "micro")


def check_supported(trainer: Any) -> None:
    """Raise ``ValueError`` for an option or engine that SAMTrainer does not run exactly."""
    cfg, args = trainer.sam_config, trainer.args
    if cfg.ascent not in ASCENTS:
        raise ValueError(f"sam.ascent={cfg.ascent!r} is not supported by SAMTrainer; accepted: {ASCENTS}")
    if cfg.ascent == "micro" and args.per_device_train_batch_size % cfg.micro_batch_size:
        raise ValueError(f"sam.micro_batch_size={cfg.micro_batch_size} does not divide "
                         f"per_device_train_batch_size={args.per_device_train_batch_size}; pick a divisor of it")
    if cfg.variant == "rwsam" and cfg.estimator == "exact" and cfg.lam != 0:
        raise ValueError("sam.estimator='exact' is not supported by SAMTrainer (torch.func per-sample gradients "
                         "over a dict batch); accepted: 'fd', 'last_layer'")
    if cfg.variant == "rwsam" and cfg.estimator == "fd" and cfg.mu == "auto" and cfg.lam != 0:
        raise ValueError("sam.mu='auto' is not supported by SAMTrainer: its calibration takes per-sample gradients "
                         "with torch.func.vmap, which Hugging Face attention masks do not support; give sam.mu a "
                         "number > 0 (e.g. 1e-3)")
    if args.fp16:
        raise ValueError("fp16=True is not supported by SAMTrainer (its GradScaler steps outside the SAM step); "
                         "accepted: bf16=True or fp32")
    if args.torch_compile:
        raise ValueError("torch_compile=True is not supported by SAMTrainer; accepted: torch_compile=False")
    if args.n_gpu > 1:
        raise ValueError(f"n_gpu={args.n_gpu} (torch.nn.DataParallel) is not supported by SAMTrainer; launch "
                         "one process per device with torchrun (DDP)")
    if len(trainer.label_names) != 1:
        raise ValueError(f"label_names={trainer.label_names} must name exactly one labels entry (what "
                         "per_sample_loss takes)")
    if args.fsdp and not trainer.is_fsdp_enabled:
        raise ValueError(f"fsdp={args.fsdp!r}: Accelerate did not turn FSDP on "
                         f"({trainer.accelerator.distributed_type}; accelerate 1.16's AcceleratorState enables its "
                         "FSDP plugin on accelerator devices only, never MULTI_CPU: accelerate/state.py:947-977), so "
                         "Trainer would run DDP instead; run on GPUs, or leave fsdp off for DDP")
    if trainer.is_fsdp_enabled:
        _check_fsdp(trainer.accelerator.state.fsdp_plugin)
    if trainer.is_deepspeed_enabled:
        _check_deepspeed(trainer)


def _check_deepspeed(trainer: Any) -> None:
    """DeepSpeed: dist-sam's adapter's own checks (ZeRO stage, precision) on Trainer's filled-in config."""
    from ...deepspeed import check_config

    config = dict(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    cfg = trainer.sam_config
    if stage == 3 and cfg.variant == "rwsam" and cfg.estimator != "last_layer":
        raise ValueError(f"sam.estimator={cfg.estimator!r} is not supported by SAMTrainer under "
                         "zero_optimization.stage=3: the ZeRO-3 adapter runs its ascent with every forward hook "
                         "suspended (dist_sam.distributed.zero3.whole_module), the hook that unpacks Trainer's dict "
                         "batch among them; accepted: estimator='last_layer' (or SAM, USAM)")
    sam = {"variant": cfg.variant, "rho": cfg.rho, "adaptive": cfg.adaptive, "eta": cfg.eta, "ascent": cfg.ascent,
           "interval": cfg.interval}
    if cfg.ascent == "micro":
        sam["micro_batch_size"] = cfg.micro_batch_size
    if cfg.variant == "rwsam":
        sam.update(lam=cfg.lam, estimator=cfg.estimator, mu=cfg.mu, num_directions=cfg.num_directions,
                   normalization=cfg.normalization)
    config["sam"] = sam
    config.pop("train_micro_batch_size_per_gpu", None)  # Trainer's; checked above against micro_batch_size
    check_config(config)


def _check_fsdp(plugin: Any) -> None:
    """FSDP: version 2 (``fully_shard``), which dist-sam's FSDP2 engine runs; no CPU offload (untried)."""
    if plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_config version={plugin.fsdp_version} (FSDP1) is not supported by SAMTrainer; "
                         "accepted: version 2 (FSDP2, fully_shard)")
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError("fsdp_config cpu_offload=True is not supported by SAMTrainer (FSDP2's CPUOffloadPolicy is "
                         "untried with the perturbation on unsharded copies); accepted: cpu_offload=False")
