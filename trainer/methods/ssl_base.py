"""Shared part of the self-supervised methods: how they are evaluated.

A self-supervised model has no classifier, so the engine's usual evaluation reports a weighted
kNN classifier on its features instead (the training images as the bank, cosine similarity,
votes weighted by exp(sim / t)). It is cheap and shows whether pre-training is learning,
with the same balanced / many / medium / few numbers as every other method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ltrainer.configspec as spec
from .. import distributed as dist_utils
from .. import knn
from ..extraction import BlockRows
from .base import Method


class SelfSupervised(Method):
    config = {"knn": {
        "k": spec.F("int", knn.DEFAULT_K, ge=1,
                    help="neighbours of the kNN monitor of self-supervised methods"),
        "t": spec.F("float", knn.DEFAULT_T, gt=0.0114,
                    help="temperature of the neighbours' weighted vote (trainer/knn.py, also "
                         "the feature-bank tools' default)"),
        "bank_dtype": spec.F("str", "float32", "float32", "float16",
                             help="storage of the monitor's feature bank; float16 halves it "
                                  "(iNat: 0.9 -> 0.45 GB per rank of 4), similarities are "
                                  "still computed in float32"),
    }}
    bank_block = 16384  # rows per stored bank block: bounds the float32 copy of one block

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.features(images).float(), dim=1)

    def prepare_eval(self, ctx) -> None:
        """Each rank keeps its own shard of the training features: a gathered bank would be W
        copies of the whole set (GBs per GPU for iNaturalist). The shard is copied into
        preallocated blocks of knn.bank_dtype as the batches come, so the peak is the bank
        plus one block (extraction.BlockRows), and the previous bank is freed first."""
        self.bank = None
        sink = BlockRows(getattr(torch, self.cfg.knn.bank_dtype), self.bank_block)
        ctx.embed("train", self.features, gather=False, on_batch=sink)
        self.bank, self.bank_labels = sink.finish(ctx.device)
        self.bank_size = sum(dist_utils.gather_sizes(len(self.bank_labels), ctx.device))

    @torch.no_grad()
    def predict(self, model, images):
        return knn.scores(self.features(images), self.bank, self.bank_labels,
                          self.data.num_classes, min(self.cfg.knn.k, self.bank_size),
                          self.cfg.knn.t)
