"""Mean Teacher (Tarvainen & Valpola 2017; the paper's Appendix): the student learns from the
labels and from agreeing with a teacher whose weights are an exponential moving average of its
own, on the pool: loss = L(D_L) + omega * MSE(softmax(student), softmax(teacher)).

Student and teacher see the same augmented pool image with independent Gaussian noise
(semi.noise) drawn from (seed, step, rank). The teacher is what gets evaluated and saved as
model_final.pt (it is usually the better of the two).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

import ltrainer.configspec as spec
from ..ema import ema_update, frozen_copy, warmup_decay
from .registry import register
from .semi_base import SemiSupervised


@register
class MeanTeacher(SemiSupervised):
    name = "mean_teacher"
    config = {"semi": {
        "ema_decay": spec.F("float", 0.99, ge=0, lt=1, help="teacher = EMA of the student"),
        "noise": spec.F("float", 0.15, ge=0, help="std of the Gaussian input noise, drawn "
                                                  "separately for student and teacher"),
    }}

    def __init__(self, cfg, data, device, pool=None):
        super().__init__(cfg, data, device, pool)
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.teacher = frozen_copy(self.model, device, fmt)   # a submodule (trainer/ema.py)

    def training_step(self, model, batch, ctx):
        images, labels, u_images = batch.images, batch.labels, batch.u_images
        sigma, n = self.cfg.semi.noise, images.shape[0]
        g = ctx.generator(0x7EAC, u_images.device, per_rank=True)

        def noisy(x):
            if sigma == 0:
                return x
            return x + sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

        student_in = noisy(u_images)
        teacher_in = noisy(u_images)
        logits = model(torch.cat([images, student_in]))
        self.teacher.train()      # batch statistics, as the student
        with torch.no_grad():
            target = F.softmax(self.teacher(teacher_in).float(), dim=1)
        loss_l = self.loss(logits[:n], labels)
        loss_u = F.mse_loss(F.softmax(logits[n:].float(), dim=1), target)
        loss = loss_l + self.unlabeled_weight(ctx.epoch) * loss_u
        return loss, self.labeled_logs(logits[:n], labels, loss_l, loss_u, loss)

    def on_step_end(self, model, ctx) -> None:
        # teacher <- EMA of the student's parameters; its BatchNorm statistics come from its
        # own forward passes, as in the original; the original's warm-up (warmup_decay)
        ema_update(self.teacher, self.model, warmup_decay(ctx.step, self.cfg.semi.ema_decay))

    @torch.no_grad()
    def predict(self, model, images):
        self.teacher.eval()
        return self.teacher(images)

    def final_model(self):
        return self.teacher
