"""Model factory: look up a backbone by name and put a classifier head on it.

Configs name models by string ("resnet32", "resnet50", ...), so every backbone is reached
through the `BACKBONES` registry. A backbone maps images to a pooled feature vector and
exposes `out_dim`; `create_model` adds a linear or cosine head and returns a `Classifier`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import ltrainer.configspec as spec
from .heads import (HEAD_INITS, Classifier, CosineHead, LinearHead, ProjectionHead,
                    export_torchvision_state_dict, matmul_fp32)
from .split_bn import SplitBatchNorm2d, convert_split_bn
from .resnet import torchvision_resnet
from .resnet_cifar import CifarResNet, resnet_cifar
from .timm_backbone import PREFIX as TIMM_PREFIX, check_timm_name, timm_backbone


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


# name -> builder(in_channels=..., **kw) returning a backbone with `out_dim`. Every backbone
# reads the shared model keys below; the torchvision family also reads model.small_input.
BACKBONES = spec.Registry("model.name", default="resnet32", help="backbone", config={"model": {
    "channels_last": spec.F("bool", False),
    "compile": spec.F("bool", False, help="torch.compile the model"),
}})
HEADS = spec.Registry("model.head", default="linear", help="classifier on the pooled features",
                      config={"model": {"head_init": spec.F(
                          "str", "default", *HEAD_INITS,
                          help="linear head's init: nn.Linear's, or kaiming_normal as the "
                               "LDAM-DRW CIFAR ResNets (the cosine head keeps LDAM's own)")}})
HEADS.add("linear", LinearHead)
HEADS.add("cosine", CosineHead)


def _no_small_input(cfg, fail):
    if cfg.model.small_input:
        fail("model.small_input", f"model.small_input is read by the torchvision ResNets "
                                  f"({', '.join(TORCHVISION)}), not by model.name = "
                                  f"'{cfg.model.name}'")


TORCHVISION = ("resnet10", "resnet18", "resnet50")
SMALL_INPUT = {"model": {"small_input": spec.F(
    "bool", False, help="3x3 stem for torchvision ResNets on 28/32 px")}}
for _depth in (8, 20, 32, 56):
    BACKBONES.add(f"resnet{_depth}", _cifar(_depth), check=_no_small_input)
for _name in TORCHVISION:
    BACKBONES.add(_name, _torchvision(_name), config=SMALL_INPUT)
BACKBONES.add("mlp", _mlp, check=_no_small_input)
# timm/<name>: any timm model (trainer/models/timm_backbone.py; timm imported only then)
BACKBONES.add_family(TIMM_PREFIX, timm_backbone, check=check_timm_name)


def create_backbone(name: str, in_channels: int = 3, **kw) -> nn.Module:
    """Build only the feature extractor named `name` (e.g. for MoCo's encoders)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name](in_channels=in_channels, **kw)


def create_model(
    name: str, num_classes: int, in_channels: int = 3, head: str = "linear",
    head_init: str = "default", **kw
) -> Classifier:
    """Build backbone `name` with a `head` ("linear" or "cosine") for `num_classes` classes.

    `head_init` (model.head_init) initialises a linear head (see LinearHead). Extra keywords
    go to the backbone builder: `small_input`/`zero_init_residual` for the torchvision
    ResNets, `image_size`/`hidden_dim` for "mlp". Unknown keywords raise TypeError.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    backbone = create_backbone(name, in_channels=in_channels, **kw)
    extra = {"init": head_init} if HEADS[head] is LinearHead else {}
    return Classifier(backbone, HEADS[head](backbone.out_dim, num_classes, **extra))


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
