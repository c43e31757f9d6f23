"""Logit-adjusted loss (Menon et al. 2021, "Long-tail learning via logit adjustment", ICLR).

Cross-entropy on z_y + tau * log pi_y, pi the training prior: the logits z then estimate the
balanced posterior up to the temperature tau, and evaluation uses z unchanged. tau = 1 is
the paper's default (and Balanced Softmax, Ren et al. 2020); tau = 0 is plain cross-entropy.
The post-hoc variant (adjusting a CE model's logits at test time) is the method
'logit_adjust'. Class weights (Reweight / DRW) apply as in CE.
"""

from __future__ import annotations

from typing import Sequence

import torch

import ltrainer.configspec as spec
from .registry import LOSSES
from .balanced_softmax import BalancedSoftmaxLoss


@LOSSES.register("logit_adjusted", config={"loss": {
    "la_tau": spec.F("float", 1.0, ge=0, help="logit_adjusted: weight of log(prior) added to "
                                              "the logits in training (1 = the paper's)")}})
class LogitAdjustedLoss(BalancedSoftmaxLoss):
    """Balanced Softmax with the log prior scaled by tau; float32 even under autocast."""

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0,
                 class_weights: torch.Tensor | None = None, reduction: str = "mean"):
        if tau < 0:
            raise ValueError(f"logit_adjusted: tau must be >= 0, got {tau}")
        if not class_counts or min(class_counts) <= 0:
            raise ValueError(f"logit_adjusted: every class needs at least one training "
                             f"sample (its prior is n_y / n), got counts {class_counts}")
        super().__init__(class_counts, class_weights, reduction)
        self.tau = float(tau)
        self.log_prior = self.log_prior * self.tau

    @classmethod
    def from_config(cls, c, class_counts):
        return cls(class_counts, tau=c.la_tau)
