"""Shared part of the self-supervised methods: how they are evaluated.

A self-supervised model has no classifier, so the engine's usual evaluation reports a weighted
kNN classifier on its features instead (the training images as the bank, cosine similarity,
votes weighted by exp(sim / t)). It is cheap and shows whether pre-training is learning,
with the same balanced / many / medium / few numbers as every other method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import configspec as spec

from .. import distributed as dist_utils
from ..models import matmul_fp32
from .base import Method


def knn_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int, t: float, block: int = 65536) -> torch.Tensor:
    """Class scores of L2-normalized queries from their k most similar bank entries.

    With several processes `bank` is this rank's shard of the bank (never gathered) and every
    rank calls this alike (the engine's embed sees to it): the queries of all ranks are
    gathered (one eval batch), each rank ranks them against its shard, and only each
    query's k best candidates of every shard travel back to its rank, where they are merged.
    Memory is bounded by `block` bank rows per similarity matrix, whatever the bank size."""
    sizes = dist_utils.gather_sizes(len(query), query.device)
    top, labels = _shard_topk(dist_utils.all_gather_cat(query, sizes), bank, bank_labels, k,
                              block)
    if len(sizes) > 1:
        n, w, kk = len(query), len(sizes), top.shape[1]
        merge = lambda x: dist_utils.all_to_all_rows(x, sizes, [n] * w).view(w, n, kk) \
            .transpose(0, 1).reshape(n, w * kk)
        top, labels = merge(top), merge(labels)
        top, j = top.topk(kk, dim=1)
        labels = labels.gather(1, j)
    weights = (top / t).exp()       # a padded candidate (-inf) weighs 0
    scores = torch.zeros(query.shape[0], num_classes, device=query.device)
    return scores.scatter_add_(1, labels, weights)


def _shard_topk(queries, bank, bank_labels, k: int, block: int):
    """(similarities, labels) [Q, k] of each query's k best rows of `bank` (a tensor, cut into
    `block` rows, or a list of stored blocks), block by block in float32 (also under autocast:
    bf16 ties reorder the top-k; a float16 bank is widened one block at a time); padded with
    -inf when the shard holds fewer than k rows."""
    top = queries.new_empty((len(queries), 0), dtype=torch.float32)
    labels = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
    blocks = bank if isinstance(bank, list) else [bank[a:a + block]
                                                  for a in range(0, len(bank), block)]
    start = 0
    for rows in blocks:
        sims = matmul_fp32(queries, rows.T)
        s, i = sims.topk(min(k, sims.shape[1]), dim=1)
        lab = bank_labels[start:start + len(rows)][i]
        start += len(rows)
        if top.shape[1]:
            s, j = torch.cat([top, s], 1).topk(min(k, top.shape[1] + s.shape[1]), dim=1)
            lab = torch.cat([labels, lab], 1).gather(1, j)
        top, labels = s, lab
    if top.shape[1] < k:
        pad = k - top.shape[1]
        top = torch.cat([top, top.new_full((len(queries), pad), float("-inf"))], 1)
        labels = torch.cat([labels, labels.new_zeros((len(queries), pad))], 1)
    return top, labels


class SelfSupervised(Method):
    config = {"knn": {
        "k": spec.F("int", 20, ge=1, help="neighbours of the kNN monitor of self-supervised "
                                          "methods"),
        "t": spec.F("float", 0.1, gt=0, help="temperature of the neighbours' weighted vote"),
        "bank_dtype": spec.F("str", "float32", "float32", "float16",
                             help="storage of the monitor's feature bank; float16 halves it "
                                  "(iNat: 0.9 -> 0.45 GB per rank of 4), similarities are "
                                  "still computed in float32"),
    }}
    bank_block = 16384  # rows per stored bank block: bounds the float32 copy of one block

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.features(images).float(), dim=1)

    def prepare_eval(self, trainer) -> None:
        """Each rank keeps its own shard of the training features: a gathered bank would be W
        copies of the whole set (GBs per GPU for iNaturalist). The shard is copied into
        preallocated blocks of knn.bank_dtype as the batches come, so the peak is the bank
        plus one block (not a list of batches plus their concatenation, nor a heap fragmented
        by thousands of small kept tensors), and the previous bank is freed first."""
        self.bank = None
        dtype = getattr(torch, self.cfg.knn.bank_dtype)
        blocks, labels, filled = [], [], [0]

        def keep(out, y):     # copy rows into preallocated blocks: no small tensors kept
            a = 0
            while a < len(out):
                if not blocks or filled[0] == len(blocks[-1]):
                    blocks.append(out.new_empty((self.bank_block, out.shape[1]), dtype=dtype))
                    labels.append(y.new_empty(self.bank_block))
                    filled[0] = 0
                f, n = filled[0], min(len(out) - a, len(blocks[-1]) - filled[0])
                blocks[-1][f:f + n].copy_(out[a:a + n])
                labels[-1][f:f + n].copy_(y[a:a + n])
                filled[0], a = f + n, a + n

        trainer.embed("train", self.features, gather=False, on_batch=keep)
        if blocks and filled[0] < len(blocks[-1]):
            blocks[-1], labels[-1] = blocks[-1][:filled[0]].clone(), labels[-1][:filled[0]]
        self.bank = blocks
        self.bank_labels = torch.cat(labels) if labels else \
            torch.empty(0, dtype=torch.long, device=trainer.device)
        self.bank_size = sum(dist_utils.gather_sizes(len(self.bank_labels), trainer.device))

    @torch.no_grad()
    def predict(self, model, images):
        return knn_scores(self.features(images), self.bank, self.bank_labels,
                          self.data.num_classes, min(self.cfg.knn.k, self.bank_size),
                          self.cfg.knn.t)
