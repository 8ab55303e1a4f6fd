"""The models ``launch/train.py`` builds: torchvision ResNet-18/50 and a small CNN for the demo."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "SmallCNN"]

MODELS = ("small_cnn", "resnet18", "resnet50")


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


def build_model(name: str, *, num_classes: int, channels_last: bool = False, sync_bn: bool = False) -> nn.Module:
    """Build a randomly initialized model (the caller seeds the RNG first).

    Args:
        name: one of :data:`MODELS`.
        num_classes: size of the classifier head.
        channels_last: store conv weights (and expect inputs) in ``torch.channels_last``.
        sync_bn: convert BatchNorm to ``SyncBatchNorm`` (statistics over the global batch; needs
            a process group at training time).
    """
    if name == "small_cnn":
        model: nn.Module = SmallCNN(num_classes)
    elif name in ("resnet18", "resnet50"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    else:
        raise ValueError(f"model.name must be one of {MODELS}, got {name!r}")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
