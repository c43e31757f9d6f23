"""Rotation pre-training (Gidaris et al. 2018), the paper's SSP on small images: predict which of
0/90/180/270 degrees each image was turned. Every image of a batch is shown in all 4 turns."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import create_model
from .registry import register
from .ssl_base import SelfSupervised


@register
class Rotation(SelfSupervised):
    name = "rotation"

    def build_model(self):
        return create_model(self.cfg.model.name, num_classes=4,
                            in_channels=self.data.in_channels, head="linear",
                            head_init=self.cfg.model.head_init, **self.model_kwargs())

    def training_step(self, model, batch, ctx):
        images = batch.images      # labels are never used
        turned = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(4)])
        target = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
        logits = model(turned)
        loss = F.cross_entropy(logits.float(), target)
        with torch.no_grad():
            acc = (logits.argmax(1) == target).float().mean() * 100
        return loss, {"loss": loss.detach(), "rot_acc": acc}
