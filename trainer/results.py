"""What a finished run leaves for its readers: `results.json` (summaries only, small whatever
the class count) and `results_per_class.npz` beside it (the per-class arrays and the confusion
counts). With 8,142 classes a dense confusion matrix in JSON was 398 MB; here the confusion is
stored sparse (one entry per (true, predicted) pair that occurred, so it grows with the number
of evaluated images, never with classes squared), compressed, with no pickled objects.

results.json is written last: its presence still means "this run is done".
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from .checkpoint import atomic_write, disk_errors
from .metrics import shot_split

# Its files in a run folder (trainer/run_folder.py imports the names from here).
RESULTS = "results.json"
PER_CLASS = "results_per_class.npz"

TOP_CONFUSED = 20
# Entries of an evaluation that hold one value per class (or the confusion): kept out of the JSON.
PER_CLASS_KEYS = ("per_class_acc", "confusion", "class_counts")


def class_count_summary(counts, many: int = 100, few: int = 20) -> dict:
    """Classes, images, min/median/max per class, many/medium/few class counts."""
    c = np.asarray(counts, dtype=np.int64)
    shots = shot_split(c.tolist(), many=many, few=few)
    return {"classes": int(c.size), "images": int(c.sum()),
            "min": int(c.min()) if c.size else 0,
            "median": float(np.median(c)) if c.size else 0.0,
            "max": int(c.max()) if c.size else 0,
            **{f"{k}_classes": len(v) for k, v in shots.items()}}


def accuracy_report(m: dict, class_counts, many: int = 100, few: int = 20) -> dict:
    """Per-class (the mean of class accuracies: balanced) and per-image (hits / images)
    accuracy, overall and by shot, the thresholds and class counts of each shot beside them.
    They differ when the evaluated split is not balanced (e.g. a long-tailed val split), and
    papers report either, so both are written, each named. From an evaluation's sparse
    confusion counts (metrics_from_confusion), in %."""
    t, p, n = (np.asarray(m["confusion"][k], dtype=np.int64) for k in ("true", "pred", "count"))
    c = len(class_counts)
    total = np.bincount(t, weights=n, minlength=c)
    hits = np.bincount(t[t == p], weights=n[t == p], minlength=c)
    shots = shot_split(list(class_counts), many=many, few=few)

    def per_image(ids):
        seen = float(total[ids].sum())
        return 100.0 * float(hits[ids].sum()) / seen if seen else None

    return {"per_class": {"all": m["balanced_top1"], **{k: m[k] for k in shots}},
            "per_image": {"all": per_image(np.arange(c)), **{k: per_image(ids)
                                                             for k, ids in shots.items()}},
            "shot_thresholds": {"many": f"> {many} training images",
                                "medium": f"{few}-{many} training images",
                                "few": f"< {few} training images"},
            "shot_classes": {k: len(ids) for k, ids in shots.items()},
            "images": int(total.sum())}


def describe_class_counts(counts, many: int = 100, few: int = 20) -> str:
    """One log phrase instead of every class's count."""
    s = class_count_summary(counts, many, few)
    return (f"{s['images']} images, {s['classes']} classes, per class min {s['min']} / median "
            f"{s['median']:g} / max {s['max']}; many/medium/few {s['many_classes']}/"
            f"{s['medium_classes']}/{s['few_classes']} classes")


def most_confused(confusion: dict, top: int = TOP_CONFUSED) -> list[dict]:
    """The `top` largest off-diagonal confusion counts: true class, predicted class, count."""
    t, p, n = (np.asarray(confusion[k]) for k in ("true", "pred", "count"))
    off = t != p
    t, p, n = t[off], p[off], n[off]
    order = np.lexsort((p, t, -n))[:top]     # most first; ties by class ids
    return [{"true": int(t[i]), "pred": int(p[i]), "count": int(n[i])} for i in order]


def split_results(results: dict) -> tuple[dict, dict]:
    """(what results.json keeps, the arrays of results_per_class.npz)."""
    small = {k: v for k, v in results.items() if k not in PER_CLASS_KEYS}
    arrays = {}
    if "per_class_acc" in results:   # NaN: a class without evaluated images
        arrays["per_class_acc"] = np.array([np.nan if a is None else a
                                            for a in results["per_class_acc"]], dtype=np.float64)
    if "class_counts" in results:
        arrays["class_counts"] = np.asarray(results["class_counts"], dtype=np.int64)
        small["class_count_summary"] = class_count_summary(results["class_counts"])
    if "confusion" in results:
        conf = results["confusion"]
        for k in ("true", "pred", "count"):
            arrays[f"confusion_{k}"] = np.asarray(conf[k], dtype=np.int64)
        small["most_confused"] = most_confused(conf)
    if arrays:
        small["per_class_file"] = PER_CLASS
    return small, arrays


def write_results(run_dir: str, results: dict) -> dict:
    """Write results_per_class.npz, then results.json (both atomically); returns the JSON part."""
    small, arrays = split_results(results)
    if arrays:
        atomic_write(os.path.join(run_dir, PER_CLASS),
                     lambda f: np.savez_compressed(f, **arrays))
    path = os.path.join(run_dir, RESULTS)
    text = json.dumps(small, indent=1).encode()
    with disk_errors(path):
        atomic_write(path, lambda f: f.write(text))
    return small


def load_per_class(run_dir: str) -> dict:
    """The per-class arrays of a finished run: 'per_class_acc' (float, NaN where a class had no
    evaluated image), 'class_counts' (training images per class) and 'confusion' (dense
    [true, predicted] counts; built on request, C x C int64, so mind C). Raises
    FileNotFoundError naming the file when the run has none."""
    path = os.path.join(run_dir, PER_CLASS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no per-class results (run unfinished, or written "
                                f"before {PER_CLASS} existed)")
    with open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        out = {k: data[k] for k in data.files}
    return out


def confusion_matrix(per_class: dict) -> np.ndarray:
    """Dense confusion matrix (rows true class, columns predicted) from load_per_class()."""
    c = len(per_class["per_class_acc"])
    m = np.zeros((c, c), dtype=np.int64)
    np.add.at(m, (per_class["confusion_true"], per_class["confusion_pred"]),
              per_class["confusion_count"])
    return m


def per_class_accuracy(per_class: dict) -> list[float | None]:
    """per_class_acc as the list evaluate_predictions returns (None: no evaluated image)."""
    return [None if np.isnan(a) else float(a) for a in per_class["per_class_acc"]]


def finished_message(path: str, results: dict) -> str:
    """What a re-run of a finished run says: complete, or partial (engine.max_steps stopped
    it) with how to continue it."""
    if not results.get("partial"):
        return f"{path} exists: this run is complete"
    return (f"{path} exists: a partial run, stopped at engine.max_steps = "
            f"{results.get('max_steps')} (global step {results.get('global_step')}, epoch "
            f"{results.get('epochs')}); to continue it, raise engine.max_steps (0 = the whole "
            f"schedule) and add run.allow_change=[engine.max_steps]")
