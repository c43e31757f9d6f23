"""The one weighted kNN vote: the self-supervised kNN monitor (methods/ssl_base.py) and the
feature-bank tools (banks/search.py) both classify with `vote`, so their figures agree.

Class score = sum over the k most similar references of exp(cos / t), cosine on unit vectors,
in float32 (finite for t > 0.0114, i.e. cos / t < 88). A padded or missing neighbour
(similarity -inf, or id -1 from an IVF search that found fewer than k) weighs 0. One default
temperature, the monitor's knn.t = 0.1 (the tools used 0.07 and exp((cos - 1) / t) before).
"""
from __future__ import annotations

import numpy as np
import torch

from . import distributed as dist_utils
from .models import matmul_fp32

DEFAULT_T = 0.1    # knn.t of the monitor, and --temperature of tools/feature_bank.py
DEFAULT_K = 20


def vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """[Q, C] class scores from each query's neighbours' similarities and labels [Q, k]."""
    weights = (sims.float() / t).exp()
    return torch.zeros(sims.shape[0], num_classes, device=sims.device).scatter_add_(
        1, labels.long(), weights)


def vote_numpy(sims: np.ndarray, ids: np.ndarray, ref_labels: np.ndarray, num_classes: int,
               t: float = DEFAULT_T) -> np.ndarray:
    """Predicted classes from a faiss-style search result (ids -1: no neighbour), by `vote`."""
    valid = ids >= 0
    s = torch.from_numpy(np.where(valid, sims, -np.inf).astype(np.float32))
    labels = torch.from_numpy(np.asarray(ref_labels)[np.where(valid, ids, 0)].astype(np.int64))
    return vote(s, labels, num_classes, t).argmax(1).numpy()


def scores(query: torch.Tensor, bank, bank_labels: torch.Tensor, num_classes: int, k: int,
           t: float = DEFAULT_T, block: int = 65536) -> torch.Tensor:
    """Class scores of L2-normalized queries from their k most similar bank entries.

    With several processes `bank` is this rank's shard of the bank (never gathered) and every
    rank calls this alike (the engine's embed sees to it): the queries of all ranks are
    gathered (one eval batch), each rank ranks them against its shard, and only each
    query's k best candidates of every shard travel back to its rank, where they are merged.
    Memory is bounded by `block` bank rows per similarity matrix, whatever the bank size."""
    sizes = dist_utils.gather_sizes(len(query), query.device)
    top, labels = shard_topk(dist_utils.all_gather_cat(query, sizes), bank, bank_labels, k,
                             block)
    if len(sizes) > 1:
        n, w, kk = len(query), len(sizes), top.shape[1]
        merge = lambda x: dist_utils.all_to_all_rows(x, sizes, [n] * w).view(w, n, kk) \
            .transpose(0, 1).reshape(n, w * kk)
        top, labels = merge(top), merge(labels)
        top, j = top.topk(kk, dim=1)
        labels = labels.gather(1, j)
    return vote(top, labels, num_classes, t)


def shard_topk(queries, bank, bank_labels, k: int, block: int = 65536):
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
        del sims
        if top.shape[1]:
            s, j = torch.cat([top, s], 1).topk(min(k, top.shape[1] + s.shape[1]), dim=1)
            lab = torch.cat([labels, lab], 1).gather(1, j)
        top, labels = s, lab
    if top.shape[1] < k:
        pad = k - top.shape[1]
        top = torch.cat([top, top.new_full((len(queries), pad), float("-inf"))], 1)
        labels = torch.cat([labels, labels.new_zeros((len(queries), pad))], 1)
    return top, labels
