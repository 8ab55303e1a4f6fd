"""The models ``launch/train.py`` builds: torchvision ResNet-18/50 and ViT-B/16, a tiny ViT of the
same code (tests, CPU), and a small CNN for the demo. All randomly initialized: nothing is downloaded."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "SmallCNN"]

MODELS = ("small_cnn", "resnet18", "resnet50", "vit_b_16", "vit_tiny")


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
        name: one of :data:`MODELS`.
        num_classes: size of the classifier head.
        channels_last: store conv weights (and expect inputs) in ``torch.channels_last``.
        sync_bn: convert BatchNorm to ``SyncBatchNorm`` (statistics over the global batch; needs
            a process group at training time).
        image_size: the input size the ViTs are built for (ResNets and the CNN take any).
    """
    if name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes)
    elif name in ("resnet18", "resnet50"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    elif name in ("vit_b_16", "vit_tiny"):
        model = _vit(name, num_classes, image_size)
    else:
        raise ValueError(f"model.name must be one of {MODELS}, got {name!r}")
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
