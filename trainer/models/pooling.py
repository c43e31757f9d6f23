"""Global average pooling that is deterministic on CUDA.

nn.AdaptiveAvgPool2d's CUDA backward uses atomic adds, so under
`torch.use_deterministic_algorithms(True)` (run.deterministic) it raises at the first backward.
A mean over the flattened spatial positions computes the same values with a backward that is a
plain expand, deterministic on every device.
"""
from __future__ import annotations

import torch
from torch import nn


class GlobalAvgPool(nn.Module):
    """[N, C, H, W] -> [N, C, 1, 1], as nn.AdaptiveAvgPool2d(1) (so torchvision's
    `flatten(avgpool(x), 1)` keeps working); no parameters, so state dicts do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1)[:, :, None, None]
