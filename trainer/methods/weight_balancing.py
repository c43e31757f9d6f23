"""Weight balancing, stage 2 (Alshammari et al. 2022, "Long-Tailed Recognition via Weight
Balancing", CVPR): on the frozen features of a stage-1 model trained with CE and a tuned
(large) weight decay, fine-tune the stage-1 classifier with a class-balanced loss, weight decay
and a MaxNorm constraint -- after every optimizer step each class's weight vector is projected
back into a ball (projected gradient descent), so head classes cannot grow their norm past
the rare ones'.

The radius follows the authors' MaxNorm_via_PGD: min_norm + max_norm.threshold x (max - min)
of the stage-1 class norms, fixed at the start; the bias is not constrained. Stage 1 is an
ordinary supervised run (optim.weight_decay: 5e-3 in their CIFAR-100-LT demo). Differences
from their demo: the class-balanced weights weigh our cross-entropy (their CB_loss 'softmax'
variant is a binary cross-entropy on the softmax), and no epoch is picked on the test set.
"""
from __future__ import annotations

import torch

import ltrainer.configspec as spec
from ..losses import class_balanced_weights
from ..models import LinearHead
from .classifier_base import FrozenBackbone
from .registry import register


def max_norm_radius(weight: torch.Tensor, threshold: float) -> float:
    """min + threshold x (max - min) of the class (row) norms."""
    norms = weight.detach().float().norm(dim=1)
    return float(norms.min() + threshold * (norms.max() - norms.min()))


@torch.no_grad()
def project_max_norm(weight: torch.Tensor, radius: float) -> None:
    """Scale every row whose norm exceeds `radius` down to it, in place."""
    weight.copy_(torch.renorm(weight, p=2, dim=0, maxnorm=radius))


@register
class WeightBalancing(FrozenBackbone):
    name = "weight_balancing"
    default_sampler = "uniform"     # the demo's shuffled loader; balance comes from the loss
    reinit_head = False
    needs_trained_head = True
    state_fields = ("radius",)
    config = {"max_norm": {
        "threshold": spec.F("float", 0.1, ge=0, le=1,
                            help="MaxNorm radius between the smallest (0) and the largest (1) "
                                 "stage-1 class norm"),
        "class_balanced": spec.F("bool", True, help="weigh the loss by class-balanced "
                                                     "weights (train_rule.cb_beta)"),
    }}

    @classmethod
    def needs_every_class(cls, cfg):
        if cfg.max_norm.class_balanced:
            return "method 'weight_balancing' weighs its loss by the class counts"
        return super().needs_every_class(cfg)

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        if not isinstance(self.model.head, LinearHead):
            raise ValueError("method 'weight_balancing' constrains a linear classifier; set "
                             "model.head: linear")
        if cfg.max_norm.class_balanced:
            self.loss.set_class_weights(
                class_balanced_weights(data.class_counts, cfg.train_rule.cb_beta).to(device))
        self.radius = max_norm_radius(self.model.head.fc.weight, cfg.max_norm.threshold)

    def on_step_end(self, model, ctx) -> None:
        super().on_step_end(model, ctx)
        project_max_norm(self.model.head.fc.weight, self.radius)

    def summary(self) -> dict:
        norms = self.model.head.fc.weight.detach().float().norm(dim=1)
        return {"max_norm_radius": self.radius,
                "class_norms": {"min": float(norms.min()), "max": float(norms.max())}}
