"""Shared part of the self-supervised methods: how they are evaluated.

A self-supervised model has no classifier, so the engine's usual evaluation reports a weighted
kNN classifier on its features instead (the training images as the bank, cosine similarity,
votes weighted by exp(sim / t)). It is cheap and shows whether pre-training is learning,
with the same balanced / many / medium / few numbers as every other method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import matmul_fp32
from .base import Method


def knn_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int, t: float) -> torch.Tensor:
    """Class scores of L2-normalized queries from their k most similar bank entries."""
    sims = matmul_fp32(query, bank.T)   # float32 under autocast: bf16 ties reorder the top-k
    top, idx = sims.topk(min(k, bank.shape[0]), dim=1)
    weights = (top / t).exp()
    scores = torch.zeros(query.shape[0], num_classes, device=query.device)
    return scores.scatter_add_(1, bank_labels[idx], weights)


class SelfSupervised(Method):
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.features(images).float(), dim=1)

    def prepare_eval(self, trainer) -> None:
        self.bank, self.bank_labels = trainer.embed("train", self.features)

    @torch.no_grad()
    def predict(self, model, images):
        return knn_scores(self.features(images), self.bank, self.bank_labels,
                          self.data.num_classes, self.cfg.knn.k, self.cfg.knn.t)
