"""Pseudo-labels of an unlabeled pool: hard labels, confidences, optional probability vectors,
a selection (confidence threshold, per-class top-k) and their accuracy against the pool's hidden
labels. One path for the `pseudo_label` pipeline stage and tools/pseudo_label.py: the same
`predictor`, each rank writing its rows to chunk files through the extraction service
(trainer/extraction.py), and the same chunk-wise assembly on rank 0 (`from_row_files`), so no
rank ever holds the pool's N x 2 (or N x C) predictions of the others.

The file is a plain .npz (loaded with allow_pickle=False; the reference pickled it), written
atomically, and carries the fingerprint of the pool it labels so that self-training refuses
labels made for another pool. Row i labels pool image i.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

import torch

from ltrainer.data_pipelines.sources import DataError

from .checkpoint import atomic_write
from .extraction import assemble_rows
from .validation import describe, finite_floats, first_sentence, int_labels

FILE = "pseudo_labels.npz"
FORMAT = "ltt-pseudo-labels"
VERSION = 1


@dataclass
class PseudoLabels:
    labels: np.ndarray            # (N,) int64 argmax class
    confidence: np.ndarray        # (N,) float32 max probability
    selected: np.ndarray          # (N,) bool: kept for training
    hidden: np.ndarray | None     # (N,) int64 true task label, -1 outside the task; analysis only
    probs: np.ndarray | None      # (N, C) float32, when kept
    meta: dict

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])


def select(labels: np.ndarray, confidence: np.ndarray, num_classes: int, threshold: float = 0.0,
           top_k: int = 0) -> np.ndarray:
    """Keep labels of confidence >= threshold, then at most the top_k most confident of each
    class (ties: the earlier row); 0 / 0 keep everything, as the reference does."""
    keep = confidence >= threshold
    if top_k:
        for c in range(num_classes):
            rows = np.nonzero(keep & (labels == c))[0]
            if len(rows) > top_k:
                ranked = rows[np.argsort(-confidence[rows], kind="stable")]
                keep[ranked[top_k:]] = False
    return keep


def from_probs(probs, hidden=None, threshold: float = 0.0, top_k: int = 0,
               keep_probs: bool = False, **meta) -> PseudoLabels:
    """Pseudo-labels from (N, C) class probabilities."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2:
        raise ValueError(f"expected (N, C) probabilities, got shape {probs.shape}")
    return from_predictions(probs.argmax(1), probs.max(1), probs.shape[1], hidden, threshold,
                            top_k, probs if keep_probs else None, **meta)


def from_predictions(labels, confidence, num_classes: int, hidden=None, threshold: float = 0.0,
                     top_k: int = 0, probs=None, present=None, **meta) -> PseudoLabels:
    """Pseudo-labels from each row's argmax class and its probability (what ranks gather
    instead of N x C probabilities). `present`: False for pool images that could not be
    read (data.on_bad_image: skip); they get label 0, confidence 0 and are never selected."""
    labels = np.asarray(labels).astype(np.int64)
    confidence = np.asarray(confidence, dtype=np.float32)
    chosen = select(labels, confidence, num_classes, threshold, top_k)
    if present is not None:
        chosen &= np.asarray(present, dtype=bool)
    hidden = None if hidden is None else np.asarray(hidden, dtype=np.int64)
    meta = {"format": FORMAT, "version": VERSION, "num_classes": num_classes,
            "count": len(labels), "threshold": threshold, "top_k": top_k, **meta}
    return PseudoLabels(labels, confidence, chosen, hidden, probs, meta)


def accuracy_report(pl: PseudoLabels) -> dict:
    """Per true class: pool images, selected, correctly labelled, accuracy (%); per pseudo
    class: how many were assigned and their precision; overall accuracy on the selected
    images of the task, and what the images outside the task were labelled as."""
    c_num, sel = pl.num_classes, pl.selected
    rep = {"count": len(pl), "selected": int(sel.sum()),
           "assigned": np.bincount(pl.labels[sel], minlength=c_num).tolist()}
    if pl.hidden is None:
        return rep
    h, y = pl.hidden, pl.labels
    per_class = []
    for c in range(c_num):
        mine, picked = h == c, sel & (h == c)
        correct = int((picked & (y == c)).sum())
        assigned = int((sel & (y == c)).sum())
        per_class.append({"class": c, "in_pool": int(mine.sum()), "selected": int(picked.sum()),
                          "correct": correct,
                          "accuracy": 100.0 * correct / picked.sum() if picked.any() else None,
                          "assigned": assigned,
                          "precision": 100.0 * correct / assigned if assigned else None})
    relevant = sel & (h >= 0)
    outside = sel & (h < 0)
    accs = [p["accuracy"] for p in per_class if p["accuracy"] is not None]
    hits = y[relevant] == h[relevant]
    rep.update(per_class=per_class,
               accuracy=100.0 * float(hits.mean()) if relevant.any() else None,
               balanced_accuracy=float(np.mean(accs)) if accs else None,
               outside_task=int(outside.sum()),
               outside_assigned=np.bincount(y[outside], minlength=c_num).tolist())
    return rep


def format_report(rep: dict) -> str:
    """The report as a short table for logs and the command line."""
    lines = [f"pseudo-labels: {rep['selected']} of {rep['count']} pool images selected; "
             f"per class {rep['assigned']}"]
    if "per_class" not in rep:
        return lines[0]

    def pct(v):
        return "-" if v is None else f"{v:.1f}"
    lines.append(f"accuracy on the task's images {pct(rep['accuracy'])}% (balanced "
                 f"{pct(rep['balanced_accuracy'])}%); {rep['outside_task']} images outside the "
                 f"task labelled as {rep['outside_assigned']}")
    lines.append("class  in pool  selected  accuracy %  assigned  precision %")
    for p in rep["per_class"]:
        lines.append(f"{p['class']:>5}  {p['in_pool']:>7}  {p['selected']:>8}  "
                     f"{pct(p['accuracy']):>10}  {p['assigned']:>8}  {pct(p['precision']):>11}")
    return "\n".join(lines)


def save(path: str, pl: PseudoLabels):
    """Write atomically as a plain .npz (no object arrays, so no pickle)."""
    arrays = {"labels": pl.labels, "confidence": pl.confidence, "selected": pl.selected,
              "meta": np.asarray(json.dumps(pl.meta))}
    if pl.hidden is not None:
        arrays["hidden_labels"] = pl.hidden
    if pl.probs is not None:
        arrays["probs"] = pl.probs
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


# meta keys a reader needs and their types (bool is refused where an int is expected)
META = {"format": str, "version": int, "num_classes": int, "count": int, "pool_fingerprint": str}


def load(path: str) -> PseudoLabels:
    """Read a pseudo-label file and check everything a trainer relies on, so that a bad file
    stops the run at start-up in one line naming it, not as an IndexError mid-training: labels
    1-D integers in [0, num_classes), confidences (and probabilities) finite and in [0, 1],
    one row per image in every array, a complete meta."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: pseudo-label file not found (written by a pseudo_label "
                        f"stage or tools/pseudo_label.py)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot be read as a pseudo-label .npz "
                        f"({first_sentence(e)})") from None
    missing = [k for k in ("labels", "confidence", "selected", "meta") if k not in arrays]
    if missing:
        raise DataError(f"{path}: not a pseudo-label file (lacks {', '.join(missing)})")
    meta = _read_meta(path, arrays["meta"])
    c_num, n = meta["num_classes"], meta["count"]
    labels = int_labels(arrays["labels"], c_num, f"{path}: labels")
    want = {"labels": (n,), "confidence": (n,), "selected": (n,), "hidden_labels": (n,),
            "probs": (n, c_num)}
    for k, shape in want.items():
        if k in arrays and arrays[k].shape != shape:
            raise DataError(f"{path}: {k} has shape {arrays[k].shape}, expected {shape} "
                            f"(meta: count {n}, num_classes {c_num})")
    finite_floats(arrays["confidence"], f"{path}: confidence", 0.0, 1.0)
    if "probs" in arrays:
        finite_floats(arrays["probs"], f"{path}: probs", 0.0, 1.0)
    if arrays["selected"].dtype != bool:
        raise DataError(f"{path}: selected must be a boolean array, got dtype "
                        f"{arrays['selected'].dtype}")
    hidden = arrays.get("hidden_labels")
    if hidden is not None:
        hidden = int_labels(hidden, c_num, f"{path}: hidden_labels", low=-1)
    return PseudoLabels(labels, arrays["confidence"], arrays["selected"], hidden,
                        arrays.get("probs"), meta)


def _read_meta(path: str, raw: np.ndarray) -> dict:
    """The JSON meta of a pseudo-label file, every key of META present with its type."""
    try:
        if raw.ndim or raw.dtype.kind not in "US":
            raise ValueError(f"a {raw.dtype} array of shape {raw.shape}, not a JSON string")
        meta = json.loads(str(raw))
    except ValueError as e:   # JSONDecodeError included
        raise DataError(f"{path}: meta is not valid JSON ({first_sentence(e)})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: meta must be a JSON object, got {describe(meta)}")
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int) \
            or meta["version"] > VERSION:
        raise DataError(f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not "
                        f"{FORMAT!r} v<={VERSION}")
    wrong = [f"{k} ({t.__name__})" for k, t in META.items()
             if type(meta.get(k)) is not t]
    if wrong:
        raise DataError(f"{path}: meta lacks or mistypes {', '.join(wrong)}")
    if meta["num_classes"] < 1 or meta["count"] < 0:
        raise DataError(f"{path}: meta num_classes = {meta['num_classes']} must be >= 1 and "
                        f"count = {meta['count']} >= 0")
    return meta


def check_pool(pl: PseudoLabels, path: str, fingerprint: str, count: int, num_classes: int):
    """Refuse labels made for another pool or task."""
    if pl.meta["pool_fingerprint"] != fingerprint or len(pl) != count:
        theirs = pl.meta["pool_fingerprint"][:12]
        raise DataError(f"semi.pseudo_labels = {path!r} labels another unlabeled pool "
                        f"({len(pl)} images, fingerprint {theirs}) "
                        f"than this config's semi section builds ({count} images, "
                        f"fingerprint {fingerprint[:12]}); use the semi.* keys of the stage "
                        f"that made them")
    if pl.num_classes != num_classes:
        raise DataError(f"semi.pseudo_labels = {path!r} has {pl.num_classes} classes, the task "
                        f"{num_classes}")


def check_path(path: str) -> list[str]:
    """Config-time check of semi.pseudo_labels when the file exists before the run (not one an
    earlier stage writes): everything `load` checks, so --dry-run and submit.py refuse it."""
    try:
        load(path)
    except DataError as e:
        return [str(e)]
    return []


def predictor(model, num_classes: int, save_probs: bool = False):
    """images -> per image [confidence, class] (+ the C probabilities with save_probs), the
    rows both pseudo-labelling paths write."""
    def predict(x):
        logits = model(x).float()
        if logits.dim() != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"the model gives outputs of shape {tuple(logits.shape[1:])}, not "
                             f"the task's {num_classes} classes (is it a classifier?)")
        p = torch.softmax(logits, 1)
        conf, label = p.max(1)
        return torch.cat([conf[:, None], label[:, None].float()] + ([p] if save_probs else []),
                         1)
    return predict


def from_row_files(folder: str, count: int, num_classes: int, hidden=None,
                   threshold: float = 0.0, top_k: int = 0, save_probs: bool = False,
                   **meta) -> PseudoLabels:
    """Pseudo-labels from the `predictor` rows that the ranks wrote to `folder`, placed by
    pool index (rows the loader skipped are unread: never selected). Read chunk by chunk; with
    save_probs the probabilities stay in a memory-mapped file in `folder` (save() streams
    them), so rank 0 holds N x 2 numbers, never N x C."""
    rows, _, present = assemble_rows(folder, count, os.path.join(folder, "rows.npy")
                                     if save_probs else None)
    probs = rows[:, 2:] if save_probs else None
    return from_predictions(np.asarray(rows[:, 1]), np.asarray(rows[:, 0]), num_classes,
                            hidden, threshold, top_k, probs, present,
                            unread=int(count - present.sum()), **meta)
