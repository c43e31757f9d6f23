"""Supervised training with any loss (CE, Focal, LDAM) and any train rule (Table 2)."""
from __future__ import annotations

import torch

from ..losses import class_balanced_weights, loss_from_config
from ..models import create_model
from ..schedules import train_rule
from . import register
from .base import Method, SamplerChoice


@register
class Supervised(Method):
    name = "supervised"

    def build_model(self):
        return create_model(self.cfg.model.name, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels, head=self.cfg.model.head,
                            **self.model_kwargs())

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        counts = data.class_counts
        self.loss = loss_from_config(cfg.loss, counts).to(device)
        self.cb_weights = class_balanced_weights(counts, cfg.train_rule.cb_beta).to(device)

    def on_epoch_start(self, epoch: int) -> SamplerChoice:
        r = self.cfg.train_rule
        rule = train_rule(r.name, epoch, r.start_epoch, r.sampler)
        self.loss.set_class_weights(self.cb_weights if rule.reweight else None)
        return SamplerChoice(rule.sampler, self.cb_weights.tolist())

    def training_step(self, model, batch):
        images, labels = batch
        logits = model(images)
        loss = self.loss(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean() * 100
        return loss, {"loss": loss.detach(), "acc": acc}
