"""Supervised training with any loss (CE, Focal, LDAM) and any train rule (Table 2), and
optionally a weight EMA (ema.decay) that is evaluated and saved instead of the raw weights."""
from __future__ import annotations

import torch

import ltrainer.configspec as spec
from ..ema import ema_update, frozen_copy, warmup_decay
from .registry import register
from .supervised_base import SupervisedBase


@register
class Supervised(SupervisedBase):
    name = "supervised"
    accumulates = True   # optim.accum_steps: a plain loss of the batch (trainer/accumulate.py)
    config = {"ema": {
        "decay": spec.F("float", 0.0, ge=0, lt=1, help="supervised: keep an EMA of the "
                                                        "weights, evaluated and saved (0: off)"),
        "warmup": spec.F("bool", True, help="running mean until the decay is reached (Mean "
                                            "Teacher's warm-up)"),
    }}

    def __init__(self, cfg, data, device, pool=None):
        super().__init__(cfg, data, device, pool)
        self.ema_model = None
        if cfg.ema.decay:      # a submodule: checkpointed with the method
            fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
            self.ema_model = frozen_copy(self.model, device, fmt)

    def on_step_end(self, model, ctx) -> None:
        if self.ema_model is not None:   # BatchNorm statistics averaged too (never trained)
            d = self.cfg.ema.decay
            ema_update(self.ema_model, self.model, warmup_decay(ctx.step, d)
                       if self.cfg.ema.warmup else d, buffers="average")

    @torch.no_grad()
    def predict(self, model, images):
        if self.ema_model is None:
            return model(images)
        self.ema_model.eval()
        return self.ema_model(images)

    def final_model(self):
        return self.model if self.ema_model is None else self.ema_model

    def training_step(self, model, batch, ctx):
        images, labels = batch.images, batch.labels
        logits = model(images)
        loss = self.loss(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean() * 100
        return loss, {"loss": loss.detach(), "acc": acc}
