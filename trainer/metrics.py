"""Evaluation metrics for long-tailed classification.

Long-tailed test sets are balanced, so besides plain top-1 we report the mean per-class
accuracy (what the paper's "error" means on the LT benchmarks) and accuracy on many/medium/
few-shot classes, split by how many *training* images each class had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def shot_split(class_counts: Sequence[int], many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Group class ids by training-set size: many > `many`, few < `few`, medium in between.

    This is classifier-balancing's convention (a class with exactly 100 or exactly 20 images
    is medium-shot); OLTR uses >= 100 / <= 20 instead, which moves the boundary classes.
    """
    if few > many:
        raise ValueError(f"few threshold ({few}) must not exceed many threshold ({many})")
    split: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for class_id, n in enumerate(class_counts):
        if n > many:
            split["many"].append(class_id)
        elif n < few:
            split["few"].append(class_id)
        else:
            split["medium"].append(class_id)
    return split


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def balanced_accuracy(hits, totals) -> float:
    """Mean per-class accuracy (%) over the classes with samples, from per-class hit and
    sample counts (what ranks can sum before dividing)."""
    return float(np.mean([100.0 * h / t for h, t in zip(hits, totals) if t]))


def evaluate_predictions(
    preds: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    train_class_counts: Sequence[int],
    many: int = 100,
    few: int = 20,
) -> dict:
    """Accuracy metrics from predicted and true class ids; all accuracies in percent.

    Returns a dict: "top1", "balanced_top1" (mean per-class accuracy), "balanced_error",
    "per_class_acc", "many"/"medium"/"few" (mean per-class accuracy of that split, None if the
    split has no class with test samples), "shot_thresholds", "confusion" and "num_samples".
    "confusion" is sparse, {"true", "pred", "count"}: one entry per pair that occurred, so it
    grows with the samples, not with num_classes squared (see metrics_from_confusion). A class
    without test samples gets None in "per_class_acc" and is left out of every mean.
    """
    preds = np.asarray(preds).reshape(-1).astype(np.int64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels differ in size: {preds.size} vs {labels.size}")
    for name, arr in (("preds", preds), ("labels", labels)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    codes, counts = np.unique(labels * num_classes + preds, return_counts=True)
    return metrics_from_confusion(codes, counts, num_classes, train_class_counts, many, few)


def metrics_from_confusion(codes: np.ndarray, counts: np.ndarray, num_classes: int,
                           train_class_counts: Sequence[int], many: int = 100,
                           few: int = 20) -> dict:
    """evaluate_predictions' result from sparse confusion counts: `codes` = true * C + pred
    (unique), `counts` how often each occurred. Ranks that evaluated shards of a split merge
    their counts and call this; the result equals evaluating the whole split at once."""
    codes, counts = np.asarray(codes, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no predictions to evaluate")
    if len(train_class_counts) != num_classes:
        raise ValueError(f"{len(train_class_counts)} class counts for {num_classes} classes")
    true, pred = codes // num_classes, codes % num_classes
    per_class_total = np.bincount(true, weights=counts, minlength=num_classes)
    correct = np.bincount(true[true == pred], weights=counts[true == pred], minlength=num_classes)
    per_class_acc: list[float | None] = [
        100.0 * correct[c] / per_class_total[c] if per_class_total[c] else None
        for c in range(num_classes)
    ]
    present = [a for a in per_class_acc if a is not None]
    balanced = float(np.mean(present))

    result = {
        "top1": 100.0 * float(correct.sum()) / total,
        "balanced_top1": balanced,
        "balanced_error": 100.0 - balanced,
        "per_class_acc": [None if a is None else float(a) for a in per_class_acc],
        "shot_thresholds": {"many": f">{many}", "medium": f"{few}-{many}", "few": f"<{few}"},
        "confusion": {"true": true, "pred": pred, "count": counts},
        "num_samples": total,
    }
    for split_name, ids in shot_split(train_class_counts, many=many, few=few).items():
        result[split_name] = _mean_or_none([per_class_acc[c] for c in ids if per_class_acc[c] is not None])
    return result


def plot_per_class_accuracy(
    per_class_acc: Sequence[float | None],
    train_class_counts: Sequence[int],
    path: str | Path,
    title: str = "",
    many: int = 100,
    few: int = 20,
) -> Path:
    """Write a PNG of per-class accuracy against training-set size (log x axis).

    Shows at a glance how accuracy falls from head to tail classes; points are coloured by
    shot split and the many/few thresholds are drawn as vertical lines. matplotlib is imported
    here, and only its object-oriented Agg API is used, so importing this module stays cheap
    and no global pyplot backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(per_class_acc) != len(train_class_counts):
        raise ValueError("per_class_acc and train_class_counts differ in length")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    for split_name, ids in shot_split(train_class_counts, many=many, few=few).items():
        # A class with no training images cannot sit on a log axis; it is left out.
        ids = [c for c in ids if per_class_acc[c] is not None and train_class_counts[c] > 0]
        if ids:
            ax.scatter(
                [train_class_counts[c] for c in ids],
                [per_class_acc[c] for c in ids],
                s=18,
                color=colors[split_name],
                label=f"{split_name} ({len(ids)} classes)",
            )
    ax.axvline(many, color="gray", linestyle="--", linewidth=1)
    ax.axvline(few, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training images in class (log scale)")
    ax.set_ylabel("per-class accuracy (%)")
    ax.set_title(title or f"per-class accuracy (many >{many}, few <{few})")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
