"""Supervised training with any loss (CE, Focal, LDAM) and any train rule (Table 2)."""
from __future__ import annotations

import torch

from .registry import register
from .supervised_base import SupervisedBase


@register
class Supervised(SupervisedBase):
    name = "supervised"
    accumulates = True   # optim.accum_steps: a plain loss of the batch (trainer/accumulate.py)

    def training_step(self, model, batch, ctx):
        images, labels = batch.images, batch.labels
        logits = model(images)
        loss = self.loss(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean() * 100
        return loss, {"loss": loss.detach(), "acc": acc}
