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
import torch.nn.functional as F
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
            return self._uneven_groups(x, k)
        # The groups side by side as channels, (n/k, k*c, h, w): one native batch-norm call
        # computes every group's statistics (faster on CPU than reducing a 5-d view).
        channels_last = x.dim() == 4 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last)
        side = x.view(k, n // k, c, h, w).transpose(0, 1).reshape(n // k, k * c, h, w)
        track = self.track_running_stats
        mean = self.running_mean.repeat(k) if track else None
        var = self.running_var.repeat(k) if track else None
        weight = self.weight.repeat(k) if self.affine else None
        bias = self.bias.repeat(k) if self.affine else None
        m = self.momentum if self.momentum is not None else 0.1
        y = F.batch_norm(side, mean, var, weight, bias, True, m, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean[:c])
                self.running_var.copy_(var[:c])
                self.num_batches_tracked += 1
        y = y.view(n // k, k, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y

    def _uneven_groups(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """A short batch (data.on_bad_image: skip dropped an image): contiguous groups whose
        sizes differ by at most one, as the samplers would cut it, one batch-norm call each
        (rare, so the slower path is fine); running statistics follow the first group."""
        m = self.momentum if self.momentum is not None else 0.1
        out = []
        for i, part in enumerate(p for p in torch.tensor_split(x, k) if len(p)):
            first = i == 0 and self.track_running_stats
            out.append(F.batch_norm(part, self.running_mean if first else None,
                                    self.running_var if first else None, self.weight,
                                    self.bias, True, m, self.eps))
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
        return torch.cat(out)


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
