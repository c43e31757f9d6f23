"""Tests for trainer.losses against values computed by hand with plain Python floats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ltrainer.trainer.losses import (
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    class_balanced_weights,
    create_loss,
    ldam_margins,
)

LOGITS_2x3 = [[0.2, -0.1, 0.5], [0.9, 0.3, -0.4]]
TARGET_2 = [2, 0]


def _logsumexp(xs):
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def test_cb_weights_by_hand():
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**5000), (1 - beta) / (1 - beta**50)]
    expected = [r * 2 / sum(raw) for r in raw]
    w = class_balanced_weights([5000, 50])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(w.sum()) == pytest.approx(2.0, rel=1e-6)
    assert w[1] > w[0]


def test_cb_weights_reject_bad_input():
    with pytest.raises(ValueError):
        class_balanced_weights([10, 0])
    with pytest.raises(ValueError):
        class_balanced_weights([10, 5], beta=1.0)


def test_ldam_margins_by_hand():
    counts = [5000, 2997, 50]
    raw = [n ** -0.25 for n in counts]
    expected = [0.5 * r / max(raw) for r in raw]
    m = ldam_margins(counts, max_m=0.5)
    assert m.tolist() == pytest.approx(expected, rel=1e-6)
    assert m.tolist()[0] == pytest.approx(0.5 * 0.01**0.25, rel=1e-6)
    assert LDAMLoss(counts).margins.tolist() == pytest.approx(expected, rel=1e-6)


def _ldam_by_hand(counts, logits, target, s=30.0, max_m=0.5, weights=None):
    raw = [n ** -0.25 for n in counts]
    margins = [max_m * r / max(raw) for r in raw]
    total, norm = 0.0, 0.0
    for row, y in zip(logits, target):
        z = [s * (v - margins[y]) if j == y else s * v for j, v in enumerate(row)]
        w = 1.0 if weights is None else weights[y]
        total += w * (_logsumexp(z) - z[y])
        norm += w
    return total / norm


def test_ldam_loss_by_hand():
    counts = [5000, 2997, 50]
    loss = LDAMLoss(counts)(torch.tensor(LOGITS_2x3), torch.tensor(TARGET_2))
    assert loss.item() == pytest.approx(_ldam_by_hand(counts, LOGITS_2x3, TARGET_2), rel=1e-5)

    weights = [0.3, 1.0, 1.7]
    ldam = create_loss("ldam", counts, s=10.0, max_m=0.3)
    ldam.set_class_weights(torch.tensor(weights))
    loss = ldam(torch.tensor(LOGITS_2x3), torch.tensor(TARGET_2))
    expected = _ldam_by_hand(counts, LOGITS_2x3, TARGET_2, s=10.0, max_m=0.3, weights=weights)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ldam_margin_only_on_true_class():
    logits = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    no_margin = LDAMLoss([100, 50, 20, 10], max_m=0.0, s=30.0)(logits, target)
    assert torch.allclose(no_margin, F.cross_entropy(30.0 * logits, target))


def test_ldam_is_float32_under_bf16_autocast():
    counts = [5000, 2997, 50]
    ldam = LDAMLoss(counts)
    feats = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(3, 8)
    target = torch.tensor([0, 1, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(feats, weight).tanh()
        assert logits.dtype == torch.bfloat16
        loss = ldam(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ldam(logits.float(), target).item(), rel=1e-6)
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_focal_gamma0_equals_ce():
    logits = torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    counts = [50, 40, 30, 20, 10]
    focal = create_loss("focal", counts, gamma=0.0)
    assert torch.allclose(focal(logits, target), F.cross_entropy(logits, target), atol=1e-6)
    # Weighted focal divides by the batch size (reference), not by sum of weights.
    w = class_balanced_weights(counts, beta=0.99)
    focal.set_class_weights(w)
    per_sample = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(focal(logits, target), (w[target] * per_sample).mean(), atol=1e-6)


def test_focal_by_hand_gamma2():
    focal = FocalLoss([10, 10, 10], gamma=2.0, reduction="none")
    per_sample = focal(torch.tensor(LOGITS_2x3), torch.tensor(TARGET_2))
    expected = []
    for row, y in zip(LOGITS_2x3, TARGET_2):
        ce = _logsumexp(row) - row[y]
        expected.append((1 - math.exp(-ce)) ** 2 * ce)
    assert per_sample.tolist() == pytest.approx(expected, rel=1e-5)
    assert FocalLoss([10, 10, 10], gamma=2.0, reduction="sum")(
        torch.tensor(LOGITS_2x3), torch.tensor(TARGET_2)
    ).item() == pytest.approx(sum(expected), rel=1e-5)


def test_focal_is_float32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(torch.randn(4, 8), torch.randn(3, 8))
        loss = create_loss("focal", [3, 2, 1])(logits, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32


def test_ce_matches_torch_with_weights_and_smoothing():
    logits = torch.randn(10, 4)
    target = torch.randint(0, 4, (10,))
    w = torch.tensor([0.5, 1.0, 1.5, 2.0])
    ce = CrossEntropyLoss([4, 3, 2, 1], class_weights=w, label_smoothing=0.1)
    expected = F.cross_entropy(logits, target, weight=w, label_smoothing=0.1)
    assert torch.allclose(ce(logits, target), expected)
    assert create_loss("ce", [4, 3, 2, 1], reduction="none")(logits, target).shape == (10,)


@pytest.mark.parametrize("name", ["ce", "focal", "ldam"])
def test_set_class_weights_changes_loss(name):
    counts = [5000, 2997, 50]
    loss_fn = create_loss(name, counts)
    logits = torch.tensor(LOGITS_2x3)
    target = torch.tensor(TARGET_2)
    plain = loss_fn(logits, target)
    loss_fn.set_class_weights(class_balanced_weights(counts))
    weighted = loss_fn(logits, target)
    assert not torch.allclose(plain, weighted)
    loss_fn.set_class_weights(None)
    assert torch.allclose(loss_fn(logits, target), plain)
    with pytest.raises(ValueError):
        loss_fn.set_class_weights(torch.ones(2))


def test_weights_are_buffers_outside_checkpoints():
    ldam = create_loss("ldam", [3, 2, 1], class_weights=torch.ones(3))
    buffers = dict(ldam.named_buffers())
    assert set(buffers) == {"class_weights", "margins"}
    assert ldam.state_dict() == {}
    ldam.to(torch.float64)  # .to() reaches the buffers (the same path a device move takes)
    assert ldam.margins.dtype == torch.float64
    # Losses still compute in float32 and weights from any dtype are accepted.
    loss = ldam(torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([1]))
    assert loss.dtype == torch.float32


def test_create_loss_unknown_name():
    with pytest.raises(ValueError, match="ldam"):
        create_loss("hinge", [1, 2])


def test_ce_is_float32_for_bf16_logits_and_copies_weights():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    target = torch.tensor([0, 1, 2, 0])
    w = torch.tensor([1.0, 2.0, 3.0])
    ce = create_loss("ce", [3, 2, 1], class_weights=w)
    loss = ce(logits, target)
    assert loss.dtype == torch.float32
    w.mul_(10)  # editing the caller's tensor afterwards must not change the loss
    assert torch.equal(ce(logits, target), loss)
