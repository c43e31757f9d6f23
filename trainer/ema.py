"""Exponential moving averages of a model's weights: one implementation for Mean Teacher's
teacher, MoCo's key encoder and the weight EMA a supervised run may evaluate (ema.decay).

target <- decay * target + (1 - decay) * source over the parameters, as one fused update per
dtype (torch._foreach_*), with the same arithmetic as the per-tensor loop the methods used
before, so their results are unchanged. Buffers (BatchNorm statistics) either follow the
target's own forward passes ('own': Mean Teacher, MoCo, as in their papers) or are averaged
the same way ('average': a weight EMA that is only ever evaluated, timm's ModelEmaV2
convention; integer buffers such as num_batches_tracked are copied).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

BUFFERS = ("own", "average")


def frozen_copy(model: nn.Module, device=None, memory_format=None) -> nn.Module:
    """A copy of `model` that no optimizer updates (requires_grad off), on `device`."""
    out = copy.deepcopy(model)
    if device is not None or memory_format is not None:
        out = out.to(device, memory_format=memory_format or torch.contiguous_format)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float, buffers: str = "own"):
    """target <- decay * target + (1 - decay) * source (parameters; buffers per `buffers`)."""
    if buffers not in BUFFERS:
        raise ValueError(f"ema_update: buffers must be one of {BUFFERS}, got {buffers!r}")
    pairs = list(zip(target.parameters(), source.parameters()))
    if buffers == "average":
        for t, s in zip(target.buffers(), source.buffers()):
            if t.is_floating_point():
                pairs.append((t, s))
            else:
                t.copy_(s)
    groups: dict = {}
    for t, s in pairs:
        groups.setdefault((t.device, t.dtype), ([], []))
        groups[(t.device, t.dtype)][0].append(t)
        groups[(t.device, t.dtype)][1].append(s.detach().to(t.dtype))
    for ts, ss in groups.values():
        torch._foreach_mul_(ts, decay)
        torch._foreach_add_(ts, ss, alpha=1 - decay)


def warmup_decay(step: int, decay: float) -> float:
    """Mean Teacher's warm-up: a plain running mean of the first steps until it reaches
    `decay` (step 0-based), so an early target is not dominated by its random start."""
    return min(1.0 - 1.0 / (step + 2), decay)

