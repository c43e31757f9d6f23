"""Linear probe: a fresh linear classifier on a frozen representation with plain (instance-
uniform) sampling; the standard measure of a self-supervised representation."""
from __future__ import annotations

from .registry import register
from .classifier_base import FrozenBackbone


@register
class LinearProbe(FrozenBackbone):
    name = "linear_probe"
    default_sampler = "uniform"
