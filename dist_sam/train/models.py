"""The models ``launch/train.py`` builds: torchvision ResNet-18/50 and ViT-B/16, a tiny ViT of the
same code (tests, CPU), a small CNN for the demo, and any timm model as ``timm/<name>``
(``pip install 'dist-sam[timm]'``; timm is imported only for those names). All randomly
initialized: nothing is downloaded."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "TIMM_PREFIX", "build_model", "check_model_name", "SmallCNN"]

MODELS = ("small_cnn", "resnet18", "resnet50", "vit_b_16", "vit_tiny")
#: ``model.name: timm/<name>`` builds ``timm.create_model(<name>)``, ``<name>`` from ``timm.list_models()``.
TIMM_PREFIX = "timm/"


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head: fast on a CPU, enough for the digits demo."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(
            *block(3, width, True), *block(width, 2 * width, True), *block(2 * width, 4 * width, False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(name: str, *, num_classes: int, channels_last: bool = False, sync_bn: bool = False,
                image_size: int = 224) -> nn.Module:
    """Build a randomly initialized model (the caller seeds the RNG first).

    Args:
        name: one of :data:`MODELS`, or ``timm/<name>`` with ``<name>`` in ``timm.list_models()``.
        num_classes: size of the classifier head.
        channels_last: store conv weights (and expect inputs) in ``torch.channels_last``.
        sync_bn: convert BatchNorm to ``SyncBatchNorm`` (statistics over the global batch; needs
            a process group at training time).
        image_size: the input size the ViTs are built for (ResNets and the CNN take any); timm
            models that take ``img_size`` get it.
    """
    check_model_name(name)
    if name.startswith(TIMM_PREFIX):
        return _timm(name[len(TIMM_PREFIX):], num_classes, channels_last, sync_bn, image_size)
    if name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes)
    elif name in ("resnet18", "resnet50"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    elif name in ("vit_b_16", "vit_tiny"):
        model = _vit(name, num_classes, image_size)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _vit(name: str, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ViT-B/16 (the paper's §5.2 fine-tune shape), or a 2-block ViT of the same code."""
    from torchvision.models.vision_transformer import VisionTransformer

    patch = 16 if name == "vit_b_16" else 8
    if image_size % patch:
        raise ValueError(f"data.image_size={image_size} must be a multiple of {name}'s patch size {patch}")
    if name == "vit_b_16":
        dims = dict(num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
    else:
        dims = dict(num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    return VisionTransformer(image_size=image_size, patch_size=patch, num_classes=num_classes, **dims)


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm/ model names need timm: pip install 'dist-sam[timm]' ({err})") from err
    return timm


def check_model_name(name: object) -> None:
    """Raise ``ValueError`` naming ``name`` and what is accepted, unless :func:`build_model` builds it.

    A ``timm/`` name imports timm (``ImportError`` saying which extra to install without it) and
    must be in ``timm.list_models()``: ``timm.create_model`` would refuse it only after the data
    loaders are built.
    """
    if name in MODELS:
        return
    accepted = f"one of {list(MODELS)} or '{TIMM_PREFIX}<name>' with <name> from timm.list_models()"
    if not isinstance(name, str) or not name.startswith(TIMM_PREFIX):
        raise ValueError(f"config key 'model.name': got {name!r}; expected {accepted}")
    timm = _import_timm()
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" (close: {', '.join(TIMM_PREFIX + c for c in close)})" if close else ""
        raise ValueError(f"config key 'model.name': got {name!r}, not a timm model{hint}; expected {accepted}")


def _timm(arch: str, num_classes: int, channels_last: bool, sync_bn: bool, image_size: int) -> nn.Module:
    """``timm.create_model(arch)``, random init (``pretrained=False``: nothing is downloaded)."""
    timm = _import_timm()
    kwargs = dict(pretrained=False, num_classes=num_classes)
    try:  # ViTs, Swin, ... are built for data.image_size; convnets take any size and refuse img_size
        model = timm.create_model(arch, img_size=image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        model = timm.create_model(arch, **kwargs)
    if sync_bn:  # timm's converter keeps BatchNormAct2d's activation (torch's drops it)
        model = timm.layers.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
