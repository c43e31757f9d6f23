"""Nearest-neighbour search over banks: faiss indexes (exact or IVF, CPU or the process's
GPU; faiss imported only here, lazily), leave-one-out search, IVF recall, and kNN accuracy
with the one vote the kNN monitor uses (trainer/knn.py).
"""
from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import knn
from ..metrics import evaluate_predictions
from .files import Bank, BankError, check_compatible, same_bank

def require(module: str, pip_name: str):
    """Import an optional package, or say which pip package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs the optional package '{pip_name}': "
                          f"pip install {pip_name}") from None


def use_gpu(device: str = "auto") -> bool:
    """faiss-gpu with a visible GPU -> GPU; otherwise CPU ("gpu" without one is an error)."""
    faiss = require("faiss", "faiss-cpu (or faiss-gpu on GPU machines)")
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device {device!r}: choose auto, cpu or gpu")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "gpu" and gpus == 0:
        raise RuntimeError("device 'gpu' asked for, but faiss sees no GPU (faiss-cpu installed, "
                           "or no CUDA device)")
    return device != "cpu" and gpus > 0


def normalized(x: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (cosine similarity = inner product)."""
    out = np.empty(x.shape, dtype=np.float32)
    for a in range(0, len(x), batch):
        b = np.asarray(x[a:a + batch], dtype=np.float32)
        out[a:a + batch] = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return out


@dataclass
class Index:
    """A faiss index plus what must outlive it (GPU resources) and how it was built."""
    index: object
    kind: str
    gpu: bool
    nlist: int = 0
    nprobe: int = 0
    normalize: bool = False
    keep: list = field(default_factory=list)

    def prep(self, x: np.ndarray) -> np.ndarray:
        """float32, C-contiguous, unit rows if the index is cosine: done per batch, so a
        float16 memmap bank never needs a whole float32 copy besides faiss's own."""
        return normalized(x) if self.normalize else np.ascontiguousarray(x, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int, batch: int = 16384):
        sims, ids = [], []
        for a in range(0, len(queries), batch):
            s, i = self.index.search(self.prep(queries[a:a + batch]), k)
            sims.append(s)
            ids.append(i)
        return np.concatenate(sims), np.concatenate(ids)


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists, but at least 39 training points per list (faiss's own minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(ref: np.ndarray, kind: str = "flat", metric: str = "ip", nlist: int | None = None,
                nprobe: int = 16, device: str = "auto", seed: int = 0, normalize: bool = False,
                batch: int = 65536, float16: bool | None = None) -> Index:
    """Exact ("flat") or inverted-file ("ivf") index over `ref`; with `normalize` (cosine)
    rows of `ref` and of later queries are scaled to unit norm batch by batch.

    A GPU index lives on this process's CUDA device (the one the engine set), not on GPU 0,
    where every process of a node would pile its index. `float16` stores the vectors in
    half precision on the GPU (half the memory, for large banks); by default it follows the
    bank: a float16 bank loses nothing by it. Ignored on CPU."""
    faiss = require("faiss", "faiss-cpu (or faiss-gpu on GPU machines)")
    n, d = ref.shape
    ip = {"ip": True, "l2": False}[metric]
    flat = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
    keep = [flat]
    if kind == "flat":
        index, nlist = flat, 0
    elif kind == "ivf":
        nlist = nlist or default_nlist(n)
        index = faiss.IndexIVFFlat(flat, d, nlist,
                                   faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    else:
        raise ValueError(f"index kind {kind!r}: choose flat or ivf")
    out = Index(None, kind, use_gpu(device), nlist, 0, normalize, keep)
    if out.gpu:
        res = faiss.StandardGpuResources()
        keep += [index, res]
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = bool(ref.dtype == np.float16 if float16 is None else float16)
        gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.index_cpu_to_gpu(res, gpu, index, opts)
    if kind == "ivf":
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))  # k-means sample
        index.train(out.prep(ref[take]))
        out.nprobe = min(nprobe, nlist)
        _set_nprobe(faiss, index, out.nprobe, out.gpu)
    for a in range(0, n, batch):
        index.add(out.prep(ref[a:a + batch]))
    out.index = index
    return out


def _set_nprobe(faiss, index, nprobe: int, gpu: bool):
    if gpu:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        index.nprobe = nprobe


def search_excluding_self(index: Index, queries: np.ndarray, k: int, self_ids=None):
    """Top-k neighbours; with `self_ids` (the query's own row in the reference) that row is
    dropped, so a bank can be searched against itself (leave-one-out)."""
    have = index.index.ntotal - (self_ids is not None)
    if not 1 <= k <= have:
        raise BankError(f"k = {k} neighbours asked for, but the reference holds {have} "
                        f"candidates per query")
    if self_ids is None:
        return index.search(queries, k)
    sims, ids = index.search(queries, k + 1)
    self_ids = np.asarray(self_ids).reshape(-1, 1)
    hit = ids == self_ids
    drop = np.where(hit.any(1), hit.argmax(1), k)  # not found (duplicates): drop the last
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return sims[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the exact top-k neighbours that the approximate search also returned."""
    k = exact_ids.shape[1]
    hits = [len(set(a[a >= 0]) & set(e)) for a, e in zip(approx_ids, exact_ids)]
    return float(np.sum(hits) / (k * len(exact_ids)))


def knn_vote(sims: np.ndarray, ids: np.ndarray, ref_labels: np.ndarray, num_classes: int,
             temperature: float = knn.DEFAULT_T) -> np.ndarray:
    """Predicted classes by the kNN monitor's weighted vote (knn.vote); ids -1 do not vote."""
    return knn.vote_numpy(sims, ids, ref_labels, num_classes, temperature)


def knn_evaluate(query: Bank, ref: Bank, k: int = knn.DEFAULT_K,
                 temperature: float = knn.DEFAULT_T,
                 index: str = "flat", nlist: int | None = None, nprobe: int = 16,
                 device: str = "auto", recall_queries: int = 1000, many: int = 100,
                 few: int = 20, seed: int = 0) -> dict:
    """kNN accuracy of `query` against `ref` (cosine, weighted vote), overall and per shot
    split of the model's training counts; an IVF index also reports its recall@k against
    exact search on up to `recall_queries` queries."""
    check_compatible(query, ref)
    q, r = query.features, ref.features
    self_ids = np.arange(len(q)) if same_bank(query, ref) else None
    t0 = time.perf_counter()
    idx = build_index(r, index, nlist=nlist, nprobe=nprobe, device=device, seed=seed,
                      normalize=True)
    build_s = time.perf_counter() - t0
    sims, ids = search_excluding_self(idx, q, k, self_ids)
    search_s = time.perf_counter() - t0 - build_s
    preds = knn_vote(sims, ids, ref.labels, ref.num_classes, temperature)
    m = evaluate_predictions(preds, query.labels, ref.num_classes, ref.train_class_counts,
                             many=many, few=few)
    out = {"k": k, "temperature": temperature, "index": index, "gpu": idx.gpu,
           "leave_one_out": self_ids is not None, "queries": len(q), "references": len(r),
           "build_seconds": round(build_s, 3), "search_seconds": round(search_s, 3),
           **{key: m[key] for key in ("top1", "balanced_top1", "balanced_error", "many",
                                      "medium", "few", "per_class_acc")}}
    if index == "ivf":
        out.update(nlist=idx.nlist, nprobe=idx.nprobe,
                   recall=ivf_recall(q, r, ids, k, self_ids, recall_queries, seed))
    return out


def ivf_recall(q, r, approx_ids, k, self_ids, n: int, seed: int = 0) -> float:
    rows = np.sort(np.random.default_rng(seed).choice(len(q), min(n, len(q)), replace=False))
    exact = build_index(r, "flat", device="auto", normalize=True)
    sub_self = None if self_ids is None else self_ids[rows]
    _, exact_ids = search_excluding_self(exact, q[rows], k, sub_self)
    return recall_at_k(approx_ids[rows], exact_ids)
