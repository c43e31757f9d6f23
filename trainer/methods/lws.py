"""LWS: learnable weight scaling. Keep the representation and the classifier of stage 1 and
learn only one scale per class (logit_j * f_j) with class-aware sampling, which re-balances the
classifier's per-class norms without moving its directions."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models import LinearHead
from .registry import register
from .classifier_base import FrozenBackbone


class ScaledClassifier(nn.Module):
    def __init__(self, head: nn.Module, num_classes: int):
        super().__init__()
        self.head = head
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats) * self.scales


@register
class LWS(FrozenBackbone):
    name = "lws"
    reinit_head = False
    needs_trained_head = True

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        if not isinstance(self.model.head, LinearHead):
            raise ValueError("method 'lws' scales a linear classifier; set model.head: linear")
        for p in self.model.head.parameters():
            p.requires_grad_(False)
        self.scaled = ScaledClassifier(self.model.head, data.num_classes).to(device)

    def train_module(self):
        return self.scaled

    def param_groups(self):
        return [{"params": [self.scaled.scales]}]

    @torch.no_grad()
    def predict(self, model, images):
        return self.scaled(self.model.backbone(images))

    def final_model(self):
        model = copy.deepcopy(self.model)
        s = self.scaled.scales.detach()
        model.head.fc.weight.data.mul_(s[:, None])
        model.head.fc.bias.data.mul_(s)
        return model

    def summary(self) -> dict:
        return {"lws_scales": self.scaled.scales.detach().tolist()}
