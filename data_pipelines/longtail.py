"""Long-tailed subsets exactly as the paper's reference code builds them.

The reference (imbalanced-semi-self, after LDAM-DRW) computes per-class counts from
imb_factor = 1/rho, seeds numpy's global RNG once, then for each class in order shuffles
that class's indices and keeps the first n_c. We reproduce the same random stream with a
local ``np.random.RandomState(seed)`` so the global numpy RNG is left alone.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ltrainer.configspec import F, Part

from .sources import DataError, SubsetSource

PROFILES = ("exp", "step", "none")
# SVHN-LT in the reference rotates the class order so digit 0 (the rarest in SVHN) is last.
SVHN_CLASS_ORDER = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
SVHN_N_MAX = 1000
# n_max that data.n_max: null means per source, where the reference fixes one (its
# imbalance_svhn.py keeps 1,000 per head class); other sources: len(train) / C.
REFERENCE_N_MAX = {"svhn": SVHN_N_MAX}


def n_max_for(source_name: str, n_max: Optional[float]) -> Optional[float]:
    """data.n_max, or the reference's for this source when unset (None: len(train) / C)."""
    return REFERENCE_N_MAX.get(source_name) if n_max is None else n_max


def lt_counts(num_classes: int, n_max: float, rho: float, profile: str = "exp") -> list[int]:
    """Images kept per class, head first: exp int(n_max * rho^(-i/(C-1))) or a 2-level step."""
    if num_classes < 1:
        raise ValueError(f"lt_counts: expected num_classes >= 1, got {num_classes}")
    if n_max < 0:
        raise ValueError(f"lt_counts: expected n_max >= 0, got {n_max}")
    if rho < 1:
        raise ValueError(f"lt_counts: expected rho = n_max/n_min >= 1, got {rho}")
    imb_factor = 1.0 / rho  # computed as the reference does, from imb_factor, for exact ints
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if profile == "step":
        head = num_classes // 2
        return [int(n_max)] * head + [int(n_max * imb_factor)] * (num_classes - head)
    if profile == "none":
        return [int(n_max)] * num_classes
    raise ValueError(f"lt_counts: unknown profile {profile!r}; expected one of {PROFILES}")


def class_counts(labels, num_classes: int) -> list[int]:
    """Number of items of each class 0..num_classes-1."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class_counts: labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def lt_indices(labels, counts: Sequence[int], seed: int = 0,
               class_order: Optional[Sequence[int]] = None) -> np.ndarray:
    """Indices of the long-tailed subset; counts[k] applies to class class_order[k].

    Same random sequence as ``np.random.seed(seed)`` followed, class by class in order, by
    ``idx = np.where(labels == c)[0]; np.random.shuffle(idx); idx[:n_c]``. Output is the
    concatenation in that class order, like the reference's data array.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if class_order is None:
        class_order = list(range(len(counts)))
    if len(class_order) != len(counts):
        raise ValueError(f"lt_indices: class_order has {len(class_order)} classes but counts "
                         f"has {len(counts)}; expected one count per class")
    if len(set(int(c) for c in class_order)) != len(class_order):
        raise ValueError(f"lt_indices: class_order {list(class_order)} repeats a class")
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n_c in zip(class_order, counts):
        idx = np.where(labels == int(c))[0]
        if n_c > len(idx):
            raise DataError(f"lt_indices: class {int(c)} has only {len(idx)} images but the "
                            f"long-tail profile asks for {int(n_c)}; lower n_max or rho")
        rng.shuffle(idx)
        chosen.append(idx[:int(n_c)])
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)


def make_lt_subset(source, n_max: Optional[int] = None, rho: float = 100, profile: str = "exp",
                   seed: int = 0, class_order: Optional[Sequence[int]] = None) -> SubsetSource:
    """Long-tailed view of ``source``; n_max defaults to len(source) / num_classes.

    The default is the reference's float ``len(data) / cls_num``; counts are truncated
    after scaling, so a non-integer mean gives the same ints as the reference.
    """
    num_classes = source.num_classes
    if n_max is None:
        n_max = len(source) / num_classes
    counts = lt_counts(num_classes, n_max, rho, profile)
    return SubsetSource(source, lt_indices(source.labels, counts, seed, class_order))


def _check_smallest_class(cfg, fail):
    d = cfg.data
    if d.imbalance != "none" and d.n_max is not None and lt_counts(2, d.n_max, d.rho,
                                                                   d.imbalance)[-1] < 1:
        fail("data.n_max", f"data.n_max = {d.n_max} with data.rho = {d.rho:g} leaves the "
                           f"smallest class with no image (n_max / rho = {d.n_max / d.rho:g} "
                           f"< 1): raise data.n_max or lower data.rho")


# How the long-tailed training subset is drawn (read by make_lt_subset through build.py).
CONFIG = Part({"data": {
    "imbalance": F("str", "exp", *PROFILES),
    "rho": F("float", 100.0, ge=1, help="n_max / n_min"),
    "n_max": F("int", None, nullable=True, ge=1,
               help="null = the reference's for the source (SVHN: 1000), else len(train) / C"),
    "lt_seed": F("int", 0, ge=0),
}}, _check_smallest_class, owner=__name__)
