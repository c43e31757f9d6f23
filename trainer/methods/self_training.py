"""Self-training (paper, Section 2): train on the labeled set and on the pool's pseudo-labels
(made by a `pseudo_label` stage from a model trained on the labels alone) with the run's loss
and train rule: loss = L(D_L) + omega * L(D_U)."""
from __future__ import annotations

import torch

from . import register
from .semi_base import SemiSupervised


@register
class SelfTraining(SemiSupervised):
    name = "self_training"
    uses_pseudo_labels = True

    def training_step(self, model, batch):
        images, labels = batch
        u_images, u_labels = self.next_unlabeled()
        n = images.shape[0]
        logits = model(torch.cat([images, u_images]))   # one pass: BatchNorm sees both
        loss_l = self.loss(logits[:n], labels)
        loss_u = self.loss(logits[n:], u_labels)
        loss = loss_l + self.unlabeled_weight() * loss_u
        return loss, self.labeled_logs(logits[:n], labels, loss_l, loss_u, loss)
