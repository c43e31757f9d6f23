"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2), as used by the LDAM-DRW reference.

Three stages with 16/32/64 channels and n = (depth - 2) / 6 basic blocks each. Shortcuts that
change shape use "option A": no parameters, just stride-2 subsampling plus zero channels, so
ResNet-32 keeps its ~0.46M parameters. Module names follow torchvision (conv1, bn1,
layer1..layer3, blocks with conv1/bn1/conv2/bn2) so weights are easy to inspect and export.
The backbone returns the globally average-pooled 64-d feature vector; a head turns it into
logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import GlobalAvgPool


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride` and zero-pad the new channels.

    Parameter-free on purpose: the CIFAR ResNets in the paper's recipe use it, and a 1x1
    convolution here would change both the parameter count and the results.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError("option-A shortcut can only add channels")
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            # Split the new zero channels evenly before and after the existing ones.
            before = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, before, self.extra - before))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (ReLU after the sum)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet backbone: image -> pooled features of size `out_dim` (64).

    Works for any input size (28x28 Fashion-MNIST, 32x32 CIFAR/SVHN) because pooling is
    global, and for any number of input channels.
    """

    def __init__(self, depth: int, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(32, 64, blocks_per_stage, stride=2)
        self.avgpool = GlobalAvgPool()  # deterministic on CUDA, unlike AdaptiveAvgPool2d
        self.out_dim = 64
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # Kaiming-normal conv weights as in the reference; BatchNorm keeps (1, 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def resnet_cifar(depth: int, in_channels: int = 3) -> CifarResNet:
    """Build a CIFAR ResNet backbone of the given depth (8, 20, 32, 56, ...)."""
    return CifarResNet(depth, in_channels=in_channels)
