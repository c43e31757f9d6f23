"""Supervised training with any loss (CE, Focal, LDAM) and any train rule (Table 2)."""
from __future__ import annotations

import torch

from ..losses import class_balanced_weights, create_loss
from ..models import create_model
from ..schedules import train_rule
from . import register
from .base import Method, SamplerChoice


def loss_from_config(c, class_counts):
    """The `loss` config section -> a loss module (each loss takes only its own keys)."""
    kw = {"ce": {"label_smoothing": c.label_smoothing},
          "focal": {"gamma": c.focal_gamma},
          "ldam": {"max_m": c.ldam_max_m, "s": c.ldam_s}}[c.name]
    return create_loss(c.name, class_counts, **kw)


@register
class Supervised(Method):
    name = "supervised"

    def build_model(self):
        c = self.cfg
        extra = {"small_input": True} if c.model.small_input else {}
        return create_model(c.model.name, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels, head=c.model.head,
                            image_size=c.data.image_size, **extra)

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
