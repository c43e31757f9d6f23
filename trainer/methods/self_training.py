"""Self-training (paper, Section 2): train on the labeled set and on the pool's pseudo-labels
(made by a `pseudo_label` stage from a model trained on the labels alone) with the run's loss
and train rule: loss = L(D_L) + omega * L(D_U)."""
from __future__ import annotations

import torch

import ltrainer.configspec as spec
from .registry import register
from .semi_base import SemiSupervised


@register
class SelfTraining(SemiSupervised):
    name = "self_training"
    uses_pseudo_labels = True
    config = {"semi": {"pseudo_labels": spec.F(
        "str", None, nullable=True, help="pseudo_labels.npz for self_training: '@stage' (a "
                                         "pseudo_label stage) or a file of tools/pseudo_label.py")}}

    @classmethod
    def check_config(cls, cfg, fail):
        if not cfg.semi.pseudo_labels:
            fail("semi.pseudo_labels", f"semi.pseudo_labels = {cfg.semi.pseudo_labels!r} is not "
                                       f"set: method 'self_training' trains on pseudo-labels; set "
                                       f"it to '@stage' of a pseudo_label stage or to a "
                                       f"pseudo_labels.npz of tools/pseudo_label.py")
        super().check_config(cfg, fail)

    def training_step(self, model, batch, ctx):
        images, labels, u_images, u_labels = batch
        n = images.shape[0]
        logits = model(torch.cat([images, u_images]))   # one pass: BatchNorm sees both
        loss_l = self.loss(logits[:n], labels)
        loss_u = self.loss(logits[n:], u_labels)
        loss = loss_l + self.unlabeled_weight(ctx.epoch) * loss_u
        return loss, self.labeled_logs(logits[:n], labels, loss_l, loss_u, loss)
