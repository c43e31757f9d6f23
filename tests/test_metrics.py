"""Tests for trainer.metrics on small hand-built predictions with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ltrainer.trainer.metrics import evaluate_predictions, plot_per_class_accuracy, shot_split
from ltrainer.trainer.results import confusion_matrix, split_results


def test_shot_split_boundaries():
    split = shot_split([101, 100, 20, 19, 5000, 1])
    assert split == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}
    assert shot_split([10, 30], many=30, few=10) == {"many": [], "medium": [0, 1], "few": []}
    with pytest.raises(ValueError):
        shot_split([1], many=10, few=20)


def _example():
    # class 0 (many): 3 of 4 right; class 1 (medium): 1 of 2; class 2 (few): 1 of 2.
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 1, 2])
    return preds, labels


def test_evaluate_known_confusion():
    preds, labels = _example()
    r = evaluate_predictions(preds, labels, 3, [500, 50, 5])
    assert r["top1"] == pytest.approx(100 * 5 / 8)
    assert r["per_class_acc"] == pytest.approx([75.0, 50.0, 50.0])
    assert r["balanced_top1"] == pytest.approx(175 / 3)
    assert r["balanced_error"] == pytest.approx(100 - 175 / 3)
    assert (r["many"], r["medium"], r["few"]) == pytest.approx((75.0, 50.0, 50.0))
    dense = confusion_matrix({"per_class_acc": r["per_class_acc"],
                              **{f"confusion_{k}": v for k, v in r["confusion"].items()}})
    assert dense.tolist() == [[3, 1, 0], [1, 1, 0], [0, 1, 1]]   # sparse -> dense
    assert r["shot_thresholds"] == {"many": ">100", "medium": "20-100", "few": "<20"}
    assert r["num_samples"] == 8
    json.dumps(split_results(r)[0])  # results go to JSON logs


def test_evaluate_empty_split_and_missing_class():
    preds, labels = _example()
    r = evaluate_predictions(preds, labels, 3, [500, 500, 5])
    assert r["medium"] is None
    assert r["many"] == pytest.approx(62.5)
    # A class without test samples is None and left out of every mean.
    r = evaluate_predictions(np.array([0, 1, 1]), np.array([0, 0, 1]), 3, [500, 50, 5])
    assert r["per_class_acc"] == [50.0, 100.0, None]
    assert r["balanced_top1"] == pytest.approx(75.0)
    assert r["few"] is None


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError):
        evaluate_predictions(np.array([0, 1]), np.array([0]), 2, [1, 1])
    with pytest.raises(ValueError):
        evaluate_predictions(np.array([0, 2]), np.array([0, 1]), 2, [1, 1])
    with pytest.raises(ValueError):
        evaluate_predictions(np.array([0]), np.array([0]), 2, [1, 1, 1])
    with pytest.raises(ValueError):
        evaluate_predictions(np.array([], dtype=int), np.array([], dtype=int), 2, [1, 1])


def test_plot_writes_png(tmp_path):
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50, 19, 5]
    acc = [95, 93, 90, 85, 80, 75, 70, 60, 55, 40, 10, None]
    out = plot_per_class_accuracy(acc, counts, tmp_path / "sub" / "acc.png", title="test")
    assert out.exists()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_per_class_accuracy([1.0], [1, 2], tmp_path / "bad.png")
