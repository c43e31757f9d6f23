"""Focal loss (Lin et al. 2017); with class-balanced weights it is "CB-Focal"."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import configspec as spec

from .registry import LOSSES
from .ce import ClassWeightedLoss, no_autocast


@LOSSES.register("focal", config={"loss": {"focal_gamma": spec.F(
    "float", 1.0, ge=0, help="focal: exponent of (1 - p_y); 0 = plain cross-entropy")}})
class FocalLoss(ClassWeightedLoss):
    """Per sample w_y * (1 - p_y)^gamma * CE, then the mean over the batch.

    (1 - p_y)^gamma shrinks the loss of samples the model already gets right, so training
    focuses on hard ones; gamma = 0 is plain cross-entropy. Note "mean" divides by the batch
    size, as the reference does, not by sum_i w_{y_i} like weighted CE. p_y is the true model
    probability (the reference computes it from the *weighted* CE, which differs once
    class weights are set). Runs in float32 even under autocast.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        gamma: float = 1.0,
        class_weights: torch.Tensor | None = None,
        reduction: str = "mean",
    ):
        super().__init__(class_counts, class_weights, reduction)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    @classmethod
    def from_config(cls, c, class_counts):
        return cls(class_counts, gamma=c.focal_gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with no_autocast(logits.device.type):
            logits = logits.float()
            ce = F.cross_entropy(logits, target, reduction="none")
            p_true = torch.exp(-ce)
            loss = (1.0 - p_true).pow(self.gamma) * ce
            weights = self._weights_for(logits)
            if weights is not None:
                loss = loss * weights[target]
            if self.reduction == "none":
                return loss
            if self.reduction == "sum":
                return loss.sum()
            return loss.mean()
