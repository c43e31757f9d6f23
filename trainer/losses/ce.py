"""Cross-entropy, plus the base class every class-weighted loss shares."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import ltrainer.configspec as spec
from .registry import LOSSES

REDUCTIONS = ("mean", "sum", "none")


class ClassWeightedLoss(nn.Module):
    """Base for losses whose per-class weights the train rule may swap at epoch boundaries.

    Reweight sets class-balanced weights once; DRW switches from None to them at epoch 160.
    The weights live in a non-persistent buffer: `.to(device)` moves them, but they stay out
    of checkpoints because the train rule sets them again for the epoch being resumed.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        class_weights: torch.Tensor | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.class_counts = [int(n) for n in class_counts]
        self.num_classes = len(self.class_counts)
        self.reduction = reduction
        self.register_buffer("class_weights", None, persistent=False)
        self.set_class_weights(class_weights)

    def set_class_weights(self, w: torch.Tensor | None) -> None:
        """Use per-class weights `w` (shape (C,)) from now on; None means unweighted."""
        if w is None:
            self.class_weights = None
            return
        # A private copy: later edits to the caller's tensor must not change the loss.
        w = torch.as_tensor(w, dtype=torch.float32).detach().clone()
        if w.shape != (self.num_classes,):
            raise ValueError(
                f"class weights must have shape ({self.num_classes},), got {tuple(w.shape)}"
            )
        self.class_weights = w

    @classmethod
    def from_config(cls, c, class_counts: Sequence[int]) -> "ClassWeightedLoss":
        """Build from the `loss` section; a loss with keys of its own overrides this."""
        return cls(class_counts)

    def _weights_for(self, logits: torch.Tensor) -> torch.Tensor | None:
        # The caller may set CPU weights on a GPU module, and .to() may change their dtype;
        # every loss here computes in float32, so hand back float32 weights on the logits' device.
        if self.class_weights is None:
            return None
        return self.class_weights.to(device=logits.device, dtype=torch.float32)


@LOSSES.register("ce", config={"loss": {"label_smoothing": spec.F(
    "float", 0.0, ge=0, lt=1, help="ce: weight of the uniform target mixed into the label")}})
class CrossEntropyLoss(ClassWeightedLoss):
    """Cross-entropy with optional class weights and label smoothing (torch semantics).

    Computed in float32, as autocast itself does for cross-entropy, so a bf16/fp16 model
    outside autocast gets the same loss precision as every other loss here.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ):
        super().__init__(class_counts, class_weights, reduction)
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_config(cls, c, class_counts):
        return cls(class_counts, label_smoothing=c.label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with no_autocast(logits.device.type):
            return F.cross_entropy(
                logits.float(),
                target,
                weight=self._weights_for(logits),
                label_smoothing=self.label_smoothing,
                reduction=self.reduction,
            )


def no_autocast(device_type: str):
    """Context that turns autocast off, so a loss can run in float32 under mixed precision.

    LDAM scales cosine logits by s=30 and focal raises (1 - p) to a power; in bf16/fp16 both
    lose too much precision, so these losses cast their inputs to float32 inside this context.
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
