"""Model factory: look up a backbone by name and put a classifier head on it.

Configs name models by string ("resnet32", "resnet50", ...), so every backbone is reached
through the `BACKBONES` registry. A backbone maps images to a pooled feature vector and
exposes `out_dim`; `create_model` adds a linear or cosine head and returns a `Classifier`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .heads import (Classifier, CosineHead, LinearHead, ProjectionHead,
                    export_torchvision_state_dict, matmul_fp32)
from .split_bn import SplitBatchNorm2d, convert_split_bn
from .resnet import torchvision_resnet
from .resnet_cifar import CifarResNet, resnet_cifar


class MLPBackbone(nn.Module):
    """Flatten -> Linear -> ReLU: a tiny network without BatchNorm.

    With the head it forms a 2-layer MLP. It exists for tests that compare DDP against a
    single process, where BatchNorm's per-process batch statistics would make results differ.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 28, hidden_dim: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, hidden_dim)
        self.out_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(torch.flatten(x, 1)))


def _cifar(depth: int) -> Callable[..., nn.Module]:
    # image_size is accepted and ignored: convolutional backbones work at any size, and
    # configs may pass it to every model.
    def build(in_channels: int = 3, image_size: int | None = None) -> nn.Module:
        return resnet_cifar(depth, in_channels=in_channels)

    return build


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(
        in_channels: int = 3,
        small_input: bool = False,
        zero_init_residual: bool = False,
        image_size: int | None = None,
    ) -> nn.Module:
        return torchvision_resnet(
            name,
            in_channels=in_channels,
            small_input=small_input,
            zero_init_residual=zero_init_residual,
        )

    return build


def _mlp(in_channels: int = 3, image_size: int = 28, hidden_dim: int = 64) -> nn.Module:
    return MLPBackbone(in_channels=in_channels, image_size=image_size, hidden_dim=hidden_dim)


# name -> builder(in_channels=..., **kw) returning a backbone with `out_dim`.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet8": _cifar(8),
    "resnet20": _cifar(20),
    "resnet32": _cifar(32),
    "resnet56": _cifar(56),
    "resnet10": _torchvision("resnet10"),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "mlp": _mlp,
}

HEADS: dict[str, type[nn.Module]] = {"linear": LinearHead, "cosine": CosineHead}


def create_backbone(name: str, in_channels: int = 3, **kw) -> nn.Module:
    """Build only the feature extractor named `name` (e.g. for MoCo's encoders)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name](in_channels=in_channels, **kw)


def create_model(
    name: str, num_classes: int, in_channels: int = 3, head: str = "linear", **kw
) -> Classifier:
    """Build backbone `name` with a `head` ("linear" or "cosine") for `num_classes` classes.

    Extra keywords go to the backbone builder: `small_input`/`zero_init_residual` for the
    torchvision ResNets, `image_size`/`hidden_dim` for "mlp". Unknown keywords raise TypeError.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    backbone = create_backbone(name, in_channels=in_channels, **kw)
    return Classifier(backbone, HEADS[head](backbone.out_dim, num_classes))


__all__ = [
    "BACKBONES",
    "HEADS",
    "CifarResNet",
    "Classifier",
    "CosineHead",
    "LinearHead",
    "MLPBackbone",
    "ProjectionHead",
    "SplitBatchNorm2d",
    "convert_split_bn",
    "create_backbone",
    "create_model",
    "export_torchvision_state_dict",
    "matmul_fp32",
]
