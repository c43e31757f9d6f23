"""LDAM loss (Cao et al. 2019): label-distribution-aware margins for rare classes."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import ltrainer.configspec as spec
from .registry import LOSSES
from .ce import ClassWeightedLoss, no_autocast


def ldam_margins(class_counts: Sequence[int], max_m: float = 0.5) -> torch.Tensor:
    """m_j proportional to n_j^(-1/4), rescaled so the rarest class gets exactly max_m.

    The n^(-1/4) rate is the paper's trade-off between head and tail generalisation bounds.
    """
    counts = torch.tensor([int(n) for n in class_counts], dtype=torch.float64)
    if counts.numel() == 0 or bool((counts <= 0).any()):
        raise ValueError(f"every class needs at least one sample, got counts {class_counts}")
    margins = counts.pow(-0.25)
    return (margins * (max_m / margins.max())).to(torch.float32)


def check_cosine_head(cfg, fail):
    if cfg.model.head != "cosine":
        fail("loss.name", "loss.name = 'ldam' needs a cosine classifier; set model.head: cosine")


@LOSSES.register("ldam", check=check_cosine_head, config={"loss": {
    "ldam_max_m": spec.F("float", 0.5, ge=0, help="ldam: margin of the rarest class"),
    "ldam_s": spec.F("float", 30.0, gt=0, help="ldam: scale of the cosine logits")}})
class LDAMLoss(ClassWeightedLoss):
    """Cross-entropy on s * (cos_logits - m_y * onehot(y)), optionally class-weighted.

    Expects cosine logits in [-1, 1] (a CosineHead): the margin only means something against
    bounded logits, and s then sets their temperature. Only the true-class logit is lowered,
    so rare classes must win by a larger margin. Always computed in float32 with autocast off,
    since s=30 times a bf16 cosine loses the margin in rounding. DRW = set_class_weights(CB
    weights) at the switch epoch; weighting follows F.cross_entropy (weighted mean).
    """
    needs_counts = True   # margins from n_y: every class needs a training image

    def __init__(
        self,
        class_counts: Sequence[int],
        max_m: float = 0.5,
        s: float = 30.0,
        class_weights: torch.Tensor | None = None,
        reduction: str = "mean",
    ):
        super().__init__(class_counts, class_weights, reduction)
        if max_m < 0 or s <= 0:
            raise ValueError(f"need max_m >= 0 and s > 0, got max_m={max_m}, s={s}")
        self.max_m = float(max_m)
        self.s = float(s)
        self.register_buffer("margins", ldam_margins(self.class_counts, self.max_m), persistent=False)

    @classmethod
    def from_config(cls, c, class_counts):
        return cls(class_counts, max_m=c.ldam_max_m, s=c.ldam_s)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with no_autocast(logits.device.type):
            logits = logits.float()
            margins = self.margins.to(device=logits.device, dtype=torch.float32)
            is_true = F.one_hot(target, self.num_classes).bool()
            shifted = torch.where(is_true, logits - margins[target].unsqueeze(1), logits)
            return F.cross_entropy(
                self.s * shifted,
                target,
                weight=self._weights_for(logits),
                reduction=self.reduction,
            )
