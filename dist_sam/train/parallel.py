"""How the trainer parallelizes a model: DDP, or FSDP2 units (one per residual stage or encoder block)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PARALLEL", "fsdp_units", "shard"]

PARALLEL = ("ddp", "fsdp")


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP2 units: a ResNet's residual stages (``layer1``..``layer4``,
    torchvision's and timm's), a torchvision ViT's encoder blocks, a timm model's ``blocks`` (ViTs)
    or ``stages`` (ConvNeXt, EfficientNet's ``blocks`` too), else the direct children that own parameters."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [getattr(model, f"layer{i}") for i in range(1, 5)]
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layers"):
        return list(encoder.layers)
    for name in ("blocks", "stages"):
        seq = getattr(model, name, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 1:
            return list(seq)
    return [m for m in model.children() if any(p.requires_grad for p in m.parameters())]


def shard(model: nn.Module, *, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every unit of :func:`fsdp_units`, then the root (FSDP2 needs the root too).

    Args:
        model: the module, on its device, before the optimizer is built.
        param_dtype: compute dtype of the all-gathered parameters (e.g. ``torch.bfloat16``), with
            gradients reduced in float32; ``None`` keeps the parameters' dtype. BatchNorm layers
            then become float32 units of their own.
        reshard_after_forward: FSDP2's own setting for the non-root units.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # BatchNorm keeps float32 parameters (its running statistics are float32 buffers): its own
        # unit computes in float32 and hands param_dtype on.
        bn_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=param_dtype)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters()):
                fully_shard(m, reshard_after_forward=reshard_after_forward, mp_policy=bn_policy)
    for unit in fsdp_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model
