"""cRT: classifier re-training. Re-initialize the classifier on a frozen representation and
train it with class-aware sampling (every class equally likely; an epoch is
max_class_count x C samples)."""
from __future__ import annotations

from .registry import register
from .classifier_base import FrozenBackbone


@register
class CRT(FrozenBackbone):
    name = "crt"
