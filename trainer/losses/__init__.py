"""Loss registry: configs name a loss ("ce", "focal", "ldam") and `create_loss` builds it.

Every loss takes the training-set class counts (LDAM needs them for its margins, the others
for validation of weights) and has `set_class_weights(w)`, which the train rule calls at
epoch boundaries to implement Reweight and DRW.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .ce import ClassWeightedLoss, CrossEntropyLoss, no_autocast
from .class_balanced import class_balanced_weights
from .focal import FocalLoss
from .ldam import LDAMLoss, ldam_margins

LOSSES: dict[str, type[ClassWeightedLoss]] = {
    "ce": CrossEntropyLoss,
    "focal": FocalLoss,
    "ldam": LDAMLoss,
}


def create_loss(name: str, class_counts: Sequence[int], **kw) -> nn.Module:
    """Build loss `name`; keywords go to its constructor.

    ce: class_weights, label_smoothing, reduction. focal: gamma (1.0), class_weights,
    reduction. ldam: max_m (0.5), s (30), class_weights, reduction.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[name](class_counts, **kw)


def loss_from_config(c, class_counts: Sequence[int]) -> nn.Module:
    """The `loss` config section -> a loss module (each loss reads only its own keys)."""
    kw = {"ce": {"label_smoothing": c.label_smoothing},
          "focal": {"gamma": c.focal_gamma},
          "ldam": {"max_m": c.ldam_max_m, "s": c.ldam_s}}[c.name]
    return create_loss(c.name, class_counts, **kw)


__all__ = [
    "loss_from_config",
    "LOSSES",
    "ClassWeightedLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LDAMLoss",
    "class_balanced_weights",
    "create_loss",
    "ldam_margins",
    "no_autocast",
]
