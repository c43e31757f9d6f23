"""Balanced Softmax (Ren et al. 2020, "Balanced Meta-Softmax for Long-Tailed Visual Recognition").

Training on a long-tailed set makes the softmax estimate p(y | x) under the training prior
pi_y = n_y / n; the test set is balanced. Balanced Softmax trains the logits z under the prior
instead: the loss is cross-entropy on z_y + log pi_y, so z itself models the balanced
posterior, and evaluation uses the plain logits z (nothing changes at test time: the engine
never applies a loss there). No hyperparameter; class weights (Reweight / DRW) apply as in CE.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .registry import LOSSES
from .ce import ClassWeightedLoss, no_autocast


@LOSSES.register("balanced_softmax")
class BalancedSoftmaxLoss(ClassWeightedLoss):
    """Cross-entropy on logits + log(class prior); float32 even under autocast."""
    needs_counts = True   # log n_y: every class needs a training image

    def __init__(self, class_counts: Sequence[int], class_weights: torch.Tensor | None = None,
                 reduction: str = "mean"):
        super().__init__(class_counts, class_weights, reduction)
        counts = torch.tensor(self.class_counts, dtype=torch.float64)
        if counts.numel() == 0 or bool((counts <= 0).any()):
            raise ValueError(f"balanced_softmax: every class needs at least one training "
                             f"sample (its prior is log n_y / n), got counts {class_counts}")
        self.register_buffer("log_prior", (counts / counts.sum()).log().float(),
                             persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with no_autocast(logits.device.type):
            logits = logits.float()
            shifted = logits + self.log_prior.to(device=logits.device, dtype=torch.float32)
            return F.cross_entropy(shifted, target, weight=self._weights_for(logits),
                                   reduction=self.reduction)
