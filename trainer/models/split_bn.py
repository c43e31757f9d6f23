"""BatchNorm over contiguous groups of a batch: what W data-parallel processes compute.

MoCo needs per-process BatchNorm statistics (with keys shuffled across processes) so that a
query and its key never share statistics. In a single process, or with fewer processes than
the groups a recipe wants, SplitBatchNorm2d makes one batch behave like `num_splits` processes
holding its contiguous slices - exactly how our samplers cut a global batch across ranks - so
one process reproduces a multi-process run. Running statistics follow the first group, as DDP's
buffers follow rank 0.
"""
from __future__ import annotations

import torch
from torch import nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int = 1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.num_splits
        if not self.training or k == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % k:
            raise ValueError(f"SplitBatchNorm2d: batch of {n} does not split into {k} groups")
        groups = x.view(k, n // k, c, h, w)
        mean = groups.mean(dim=(1, 3, 4))
        var = groups.var(dim=(1, 3, 4), unbiased=False)
        if self.track_running_stats:
            with torch.no_grad():
                count = (n // k) * h * w
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean[0].detach(), alpha=m)
                unbiased = var[0].detach() * count / max(count - 1, 1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
                self.num_batches_tracked += 1
        inv = torch.rsqrt(var + self.eps)
        y = (groups - mean[:, None, :, None, None]) * inv[:, None, :, None, None]
        if self.affine:
            y = y * self.weight[None, None, :, None, None] + self.bias[None, None, :, None, None]
        return y.view(n, c, h, w)


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a SplitBatchNorm2d with the same
    parameters and buffers; state-dict keys stay the same."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            new = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps,
                                   momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device if child.affine else child.running_mean.device)
            setattr(module, name, new)
        else:
            convert_split_bn(child, num_splits)
    return module
