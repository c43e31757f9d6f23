"""Focal loss (Lin et al. 2017); with class-balanced weights it is "CB-Focal"."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import ltrainer.configspec as spec
from .registry import LOSSES
from .ce import ClassWeightedLoss, no_autocast


FOCAL_FORMS = ("textbook", "reference")


def focal_terms(ce: torch.Tensor, w_y: torch.Tensor | None, gamma: float, form: str):
    """Per-sample focal loss from the per-sample CE and the true class's weight (or None).

    textbook: w_y * (1 - p_y)^gamma * CE with p_y = exp(-CE), the alpha-balanced form of
    Lin et al. reference: LDAM-DRW's losses.py focal_loss applied to the *weighted* CE,
    i.e. p = exp(-w_y CE) = p_y^w_y and (1 - p_y^w_y)^gamma * w_y * CE. They agree without
    weights.
    """
    if w_y is None:
        return (1.0 - torch.exp(-ce)).pow(gamma) * ce
    if form == "reference":
        wce = w_y * ce
        return (1.0 - torch.exp(-wce)).pow(gamma) * wce
    return w_y * (1.0 - torch.exp(-ce)).pow(gamma) * ce


@LOSSES.register("focal", config={"loss": {
    "focal_gamma": spec.F("float", 1.0, ge=0,
                          help="focal: exponent of (1 - p_y); 0 = plain cross-entropy"),
    "focal_form": spec.F("str", "textbook", *FOCAL_FORMS,
                         help="focal with class weights (CB-Focal): textbook w_y (1-p_y)^g CE, "
                              "or reference (LDAM-DRW's code: p from the weighted CE)")}})
class FocalLoss(ClassWeightedLoss):
    """Per sample w_y * (1 - p_y)^gamma * CE, then the mean over the batch.

    (1 - p_y)^gamma shrinks the loss of samples the model already gets right, so training
    focuses on hard ones; gamma = 0 is plain cross-entropy. Note "mean" divides by the batch
    size, as the reference does, not by sum_i w_{y_i} like weighted CE. With form 'textbook'
    p_y is the true model probability; form 'reference' computes it from the *weighted* CE as
    the reference code does (see focal_terms; docs/fidelity.md). Float32 even under autocast.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        gamma: float = 1.0,
        class_weights: torch.Tensor | None = None,
        reduction: str = "mean",
        form: str = "textbook",
    ):
        super().__init__(class_counts, class_weights, reduction)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if form not in FOCAL_FORMS:
            raise ValueError(f"focal form must be one of {FOCAL_FORMS}, got {form!r}")
        self.gamma = float(gamma)
        self.form = form

    @classmethod
    def from_config(cls, c, class_counts):
        return cls(class_counts, gamma=c.focal_gamma, form=c.focal_form)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with no_autocast(logits.device.type):
            logits = logits.float()
            ce = F.cross_entropy(logits, target, reduction="none")
            weights = self._weights_for(logits)
            loss = focal_terms(ce, None if weights is None else weights[target], self.gamma,
                               self.form)
            if self.reduction == "none":
                return loss
            if self.reduction == "sum":
                return loss.sum()
            return loss.mean()
