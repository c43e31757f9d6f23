"""Class-balanced weights from the "effective number of samples" (Cui et al. 2019)."""

from __future__ import annotations

from typing import Sequence

import torch


def class_balanced_weights(class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Return w_j = (1 - beta) / (1 - beta^n_j), rescaled so that sum_j w_j = C.

    Rare classes get larger weights, but less than 1/n_j would give: (1 - beta^n) / (1 - beta)
    is the "effective number" of samples, which saturates as n grows. Rescaling to sum C keeps
    the loss on the same scale as unweighted cross-entropy. Used both as loss weights
    (Reweight, DRW) and as sampling weights (Resample). Computed in float64, returned as
    float32 on the CPU.
    """
    counts = [int(n) for n in class_counts]
    if not counts:
        raise ValueError("class_counts is empty")
    if min(counts) <= 0:
        raise ValueError(f"every class needs at least one sample, got counts {counts}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = torch.tensor(counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    weights = weights * len(counts) / weights.sum()
    return weights.to(torch.float32)
