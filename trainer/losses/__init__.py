"""Loss registry: configs name a loss (`loss.name`) and `loss_from_config` builds it.

Every loss takes the training-set class counts (LDAM needs them for its margins, Balanced
Softmax for its prior) and has `set_class_weights(w)`, which the train rule calls at epoch
boundaries to implement Reweight and DRW. A loss registers itself with `@LOSSES.register(name,
config=...)` in its own file, declaring the `loss.*` keys it reads, and builds itself from them
in `from_config`; every .py file in this folder is imported, so a new loss is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Sequence

from torch import nn

from .registry import LOSSES

# The paper's three first (the order error messages list them in), then every other file here.
from . import ce, focal, ldam  # noqa: E402,F401
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .ce import ClassWeightedLoss, CrossEntropyLoss, no_autocast  # noqa: E402
from .class_balanced import class_balanced_weights  # noqa: E402
from .focal import FocalLoss  # noqa: E402
from .ldam import LDAMLoss, ldam_margins  # noqa: E402


def create_loss(name: str, class_counts: Sequence[int], **kw) -> nn.Module:
    """Build loss `name`; keywords go to its constructor.

    ce: class_weights, label_smoothing, reduction. focal: gamma (1.0), class_weights,
    reduction, form ('textbook' | 'reference'). ldam: max_m (0.5), s (30), class_weights, reduction. balanced_softmax:
    class_weights, reduction.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[name](class_counts, **kw)


def loss_from_config(c, class_counts: Sequence[int]) -> nn.Module:
    """The `loss` config section -> a loss module (each loss reads only its own keys)."""
    return LOSSES[c.name].from_config(c, class_counts)


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
