"""What banks say about a model: nearest neighbours of chosen samples, how far tail-class
queries fall among head-class references (the paper's "leakage") with the class-centroid
distances that explain it, and the per-class norms of its classifier weights.
"""
from __future__ import annotations

import numpy as np

from ..metrics import shot_split
from .files import Bank, BankError, check_compatible, same_bank
from .search import build_index, normalized, search_excluding_self

def nearest_neighbors(query: Bank, ref: Bank, rows, k: int = 8) -> list[dict]:
    """For query rows: their k nearest reference samples (label, cosine distance, path)."""
    check_compatible(query, ref)
    rows = np.asarray(rows, dtype=np.int64)
    idx = build_index(ref.features, "flat", normalize=True)
    sims, ids = search_excluding_self(idx, query.features[rows], k,
                                      rows if same_bank(query, ref) else None)
    return [{"row": int(r), "label": int(query.labels[r]), "path": str(query.paths[r]),
             "neighbors": [{"row": int(j), "label": int(ref.labels[j]),
                            "distance": float(1.0 - s), "path": str(ref.paths[j])}
                           for s, j in zip(srow, irow) if j >= 0]}
            for r, srow, irow in zip(rows, sims, ids)]


def head_tail_classes(counts, many: int = 100, few: int = 20, head=None, tail=None):
    """(head, tail, rule): many-/few-shot classes by default; when one of them is empty (e.g.
    a mild imbalance), the most / least frequent third of the classes. Explicit lists win."""
    counts = list(counts)
    if head is not None and tail is not None:
        return sorted(head), sorted(tail), "given"
    split = shot_split(counts, many=many, few=few)
    if split["many"] and split["few"]:
        h, t, rule = split["many"], split["few"], f"many-shot (>{many}) / few-shot (<{few})"
    else:
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        third = max(1, len(counts) // 3)
        h, t, rule = sorted(order[:third]), sorted(order[-third:]), "most / least frequent third"
    return sorted(head if head is not None else h), sorted(tail if tail is not None else t), rule


def describe_ids(ids, most: int = 12) -> str:
    """A class list for a caption: in full when short, else its size and ends."""
    ids = list(ids)
    if len(ids) <= most:
        return str(ids)
    return f"{len(ids)} classes [{ids[0]}, {ids[1]}, ..., {ids[-1]}]"


def leakage_from_neighbors(query_labels, nbr_labels, head, tail, num_classes: int) -> dict:
    """Per tail class: share of its queries whose neighbours are mostly (> half) head-class
    samples, the mean share of head neighbours and of own-class neighbours, and the head
    class its neighbours land in most."""
    query_labels, nbr_labels = np.asarray(query_labels), np.asarray(nbr_labels)
    is_head = np.isin(nbr_labels, head)
    out = {}
    for c in tail:
        mine = query_labels == c
        if not mine.any():
            out[int(c)] = {"samples": 0, "leaked_share": None}
            continue
        head_frac = is_head[mine].mean(1)
        hits = nbr_labels[mine][is_head[mine]]
        top = np.bincount(hits, minlength=num_classes).argmax() if hits.size else None
        out[int(c)] = {"samples": int(mine.sum()),
                       "leaked_share": float((head_frac > 0.5).mean()),
                       "head_neighbor_share": float(head_frac.mean()),
                       "own_class_neighbor_share": float((nbr_labels[mine] == c).mean()),
                       "top_head_class": None if top is None else int(top)}
    return out


def class_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Unit-norm mean of the unit-norm features of each class (NaN rows for absent ones)."""
    x = normalized(features)
    cent = np.full((num_classes, x.shape[1]), np.nan, dtype=np.float64)
    for c in range(num_classes):
        if (labels == c).any():
            m = x[labels == c].mean(0)
            cent[c] = m / max(np.linalg.norm(m), 1e-12)
    return cent


def centroid_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine distance between every centroid of `a` and every centroid of `b`."""
    return 1.0 - a @ b.T


def leakage_report(query: Bank, ref: Bank, k: int = 10, many: int = 100, few: int = 20,
                   head=None, tail=None) -> dict:
    """How far tail-class queries fall among head-class references (the paper's "leakage"),
    with the class-centroid distances that explain it."""
    check_compatible(query, ref)
    head, tail, rule = head_tail_classes(ref.train_class_counts, many, few, head, tail)
    idx = build_index(ref.features, "flat", normalize=True)
    self_ids = np.arange(len(query)) if same_bank(query, ref) else None
    _, ids = search_excluding_self(idx, query.features, k, self_ids)
    per_class = leakage_from_neighbors(query.labels, ref.labels[ids], head, tail,
                                       ref.num_classes)
    ref_c = class_centroids(ref.features, ref.labels, ref.num_classes)
    q_c = class_centroids(query.features, query.labels, ref.num_classes)
    dist = centroid_distances(ref_c, ref_c)
    q_to_ref = centroid_distances(q_c, ref_c)
    for c, row in per_class.items():
        near = min(head, key=lambda h: dist[c, h])
        row.update(nearest_head_class=int(near),
                   centroid_distance_to_nearest_head=_f(dist[c, near]),
                   query_to_own_centroid=_f(q_to_ref[c, c]),
                   query_to_nearest_head_centroid=_f(q_to_ref[c, near]))
    return {"k": k, "head": head, "tail": tail, "rule": rule, "per_class": per_class,
            "centroid_distances": [[_f(v) for v in r] for r in dist]}


def _f(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def classifier_weight_norms(state: dict, key: str | None = None) -> tuple[np.ndarray, str]:
    """L2 norm of each class's weight vector: larger for head classes after plain training,
    which is what tau-normalization corrects."""
    keys = [key] if key else [k for k in ("head.fc.weight", "head.weight", "fc.weight")
                              if k in state]
    if not keys or keys[0] not in state:
        two_d = [k for k, v in state.items() if getattr(v, "ndim", 0) == 2]
        raise BankError(f"no classifier weight {key or 'head.fc.weight / head.weight'} in the "
                        f"checkpoint; 2-D weights present: {', '.join(two_d[-5:])} (use --key)")
    w = state[keys[0]].detach().float().cpu().numpy()
    return np.linalg.norm(w, axis=1), keys[0]
