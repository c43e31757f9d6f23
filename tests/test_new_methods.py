"""Methods beyond the 2020 baselines (issue 16), each against a hand computation on tiny
inputs: logit-adjusted loss, post-hoc logit adjustment, and the evaluation protocol that
keeps hyper-parameter selection off the reported split."""
from __future__ import annotations

import logging
import math
import os
import types

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, needs_fmnist
from ltrainer.trainer.config import ConfigError, load_config

CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")


# ------------------------------------------------------------------------ logit-adjusted loss

def test_logit_adjusted_loss_against_a_hand_computation():
    """Counts [3, 1], tau = 2: the logits [1, 2] become 1 + 2 log 3/4 and 2 + 2 log 1/4, so
    p_1 = (e^2 / 16) / (9e / 16 + e^2 / 16) = e / (9 + e): loss log(1 + 9/e) for label 1 and
    log(1 + e/9) for label 0. tau = 1 is Balanced Softmax, tau = 0 plain cross-entropy."""
    from ltrainer.trainer.losses import create_loss
    logits, target = torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.tensor([1, 0])
    per_sample = create_loss("logit_adjusted", [3, 1], tau=2.0, reduction="none")(logits, target)
    assert torch.allclose(per_sample, torch.tensor([math.log(1 + 9 / math.e),
                                                    math.log(1 + math.e / 9)]), atol=1e-6)
    one = create_loss("logit_adjusted", [3, 1], tau=1.0)(logits, target)
    assert torch.isclose(one, create_loss("balanced_softmax", [3, 1])(logits, target))
    zero = create_loss("logit_adjusted", [3, 1], tau=0.0)(logits, target)
    assert torch.isclose(zero, torch.nn.functional.cross_entropy(logits, target))
    with pytest.raises(ValueError, match="logit_adjusted: every class needs at least one"):
        create_loss("logit_adjusted", [3, 0])


def test_logit_adjusted_loss_from_its_config():
    from ltrainer.trainer.losses import loss_from_config
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt_logit_adjusted.yaml"),
                      ["loss.la_tau=0.5"])
    loss = loss_from_config(cfg.loss, [10, 1])
    assert loss.tau == 0.5
    assert torch.allclose(loss.log_prior, 0.5 * torch.tensor([10 / 11, 1 / 11]).log())
    with pytest.raises(ConfigError, match="loss.la_tau = -1 must be >= 0"):
        load_config(CE, ["loss.name=logit_adjusted", "loss.la_tau=-1"])


# -------------------------------------------------------------------- post-hoc adjustment

class _Identity(nn.Module):
    """Features = inputs, so a head with weight I and bias 0 returns the inputs as logits."""
    out_dim = 2

    def forward(self, x):
        return x


class _FakeTrainer:
    """What prepare_eval uses of its StepContext: embed(split, fn) over a fixed split (one
    batch; an on_batch sink gets it, as Trainer.embed does), a device and a log."""

    def __init__(self, splits):
        self.splits, self.log, self.asked = splits, logging.getLogger("test"), []
        self.device = torch.device("cpu")

    def embed(self, split, fn, gather=True, on_batch=None):
        self.asked.append(split)
        x, y = self.splits[split]
        if on_batch is not None:
            on_batch(fn(x), y)
        return fn(x), y


def _posthoc(tmp_path, *over):
    from ltrainer.trainer.methods import create_method
    from ltrainer.trainer.models import Classifier, LinearHead, create_model
    init = tmp_path / "init.pt"
    torch.save(create_model("mlp", 2, in_channels=1, image_size=28).state_dict(), init)
    cfg = load_config(CE, ["method.name=logit_adjust", f"model.init={init}", "model.name=mlp",
                           "model.init_head=true", "sched.epochs=0", "sched.warmup_epochs=0",
                           "data.val_per_class=5", *over])
    data = types.SimpleNamespace(class_counts=[3, 1], num_classes=2, in_channels=1)
    method = create_method(cfg, data, torch.device("cpu"))
    head = LinearHead(2, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(2))
        head.fc.bias.zero_()
    method.model = Classifier(_Identity(), head)
    return method


def test_post_hoc_logit_adjustment_chooses_tau_on_val_by_hand(tmp_path):
    """Prior [3/4, 1/4]. Val logits [1, .5] (label 1) and [2, 0] (label 0), minus tau log pi:
    tau 0 predicts 0, 0 (balanced accuracy 50%); tau 1: [1.29, 1.89] -> 1, [2.29, 1.39] -> 0
    (100%); tau 2: [1.58, 3.27] -> 1, [2.58, 2.77] -> 1 (50%). So tau = 1, and the final
    classifier's bias is -log pi = [log 4/3, log 4]."""
    method = _posthoc(tmp_path, "logit_adjust.grid=[0.0, 1.0, 2.0]")
    trainer = _FakeTrainer({"val": (torch.tensor([[1.0, 0.5], [2.0, 0.0]]), torch.tensor([1, 0]))})
    method.prepare_eval(trainer)
    assert trainer.asked == ["val"]
    assert method.tau == 1.0
    assert method.search == {"0": 50.0, "1": 100.0, "2": 50.0}
    logits = method.predict(method.model, torch.tensor([[1.0, 0.5]]))
    assert torch.allclose(logits, torch.tensor([[1 - math.log(0.75), 0.5 - math.log(0.25)]]))
    final = method.final_model()
    assert torch.allclose(final.head.fc.bias, torch.tensor([math.log(4 / 3), math.log(4)]))
    summary = method.summary()
    assert summary["tau"] == 1.0 and summary["tau_selected_on"] == "val"
    assert "tau_note" not in summary        # val is held out from the reported test split


def test_post_hoc_fixed_tau_reads_no_split(tmp_path):
    method = _posthoc(tmp_path, "logit_adjust.tau=0.5")
    trainer = _FakeTrainer({})
    method.prepare_eval(trainer)
    assert trainer.asked == [] and method.tau == 0.5
    assert method.summary()["tau_selected_on"] == "config (logit_adjust.tau)"


# ---------------------------------------------------------------------- evaluation protocol

LIST = ["data.source=list", "data.train_list=a", "data.stats=imagenet", "data.root=r"]
POSTHOC = ["method.name=logit_adjust", "model.init=x", "model.init_head=true", "sched.epochs=0",
           "sched.warmup_epochs=0"]


@pytest.mark.parametrize("over, message", [
    # Fashion-MNIST can hold a validation split out of its unused training images
    (["logit_adjust.split=test"],
     r"logit_adjust\.split = 'test' selects on the split the results report \(eval\.split = "
     r"'test'\), which makes them an oracle; select on 'val' instead: set data\.val_per_class"),
    (["logit_adjust.split=test", "data.val_per_class=5"],
     r"logit_adjust\.split = 'test' selects on the split the results report"),
    # a list task with a val list must select on it
    (LIST + ["data.test_list=b", "data.val_list=v", "logit_adjust.split=test"],
     r"logit_adjust\.split = 'test' selects on the split the results report \(eval\.split = "
     r"'test'\), which makes them an oracle; select on 'val' instead$"),
])
def test_selecting_on_the_reported_split_is_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CE, POSTHOC + over)


def test_selection_on_the_only_held_out_split_is_allowed_and_said():
    """iNaturalist 2018: 'val' is the only held-out split, so it both selects and reports."""
    from ltrainer.trainer.protocol import selection_note
    cfg = load_config(CE, POSTHOC + LIST + ["data.val_list=v", "data.test_list=null",
                                            "eval.split=val"])
    note = selection_note(cfg, cfg.logit_adjust.split)
    assert "no validation split apart from it" in note and "iNaturalist" in note
    held_out = load_config(CE, POSTHOC + LIST + ["data.val_list=v", "data.test_list=t"])
    assert selection_note(held_out, held_out.logit_adjust.split) is None



# --------------------------------------------------------- progressively-balanced sampler

def test_progressive_class_probabilities_by_hand():
    """Counts [3, 0, 1] (class 1 empty), T = 4: p(t) = (1 - t/4) [3/4, 0, 1/4] + t/4 [1/2, 0, 1/2]:
    epoch 0 [.75, 0, .25], epoch 2 [.625, 0, .375], epoch 4 and later [.5, 0, .5]."""
    from ltrainer.data_pipelines.samplers import build_sampler
    s = build_sampler("progressive", [0, 2, 0, 0], batch_size=1, num_epochs=4)
    assert len(s) == 4                                   # an epoch is N draws
    for epoch, want in ((0, [.75, 0, .25]), (2, [.625, 0, .375]), (4, [.5, 0, .5]),
                        (9, [.5, 0, .5])):
        assert s.class_probs(epoch).tolist() == pytest.approx(want)
    with pytest.raises(ValueError, match="'progressive' needs num_epochs"):
        build_sampler("progressive", [0, 1], batch_size=1)


def test_progressive_sampler_draws_follow_p_and_use_items_evenly():
    import numpy as np
    from ltrainer.data_pipelines.samplers import build_sampler
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    s = build_sampler("progressive", labels, batch_size=100, num_epochs=2,
                      num_samples=30000, seed=3)
    for epoch in (0, 1, 2):
        s.set_epoch(epoch)
        order = s.global_order().numpy()
        freq = np.bincount(labels[order], minlength=3) / len(order)
        assert freq == pytest.approx(s.class_probs(epoch), abs=0.01)
        for c in range(3):                 # every item of a class drawn within 1 of the others
            hits = np.bincount(order[labels[order] == c], minlength=len(labels))
            hits = hits[labels == c]
            assert hits.max() - hits.min() <= 1, (epoch, c)
    # a pure function of (seed, epoch): rebuilt, the same order; another epoch, another one
    again = build_sampler("progressive", labels, batch_size=100, num_epochs=2,
                          num_samples=30000, seed=3)
    assert torch.equal(again.global_order(1), s.global_order(1))
    assert not torch.equal(s.global_order(0), s.global_order(1))


def test_progressive_sampler_ranks_share_one_global_order():
    """Every rank builds the single process's global order (the shared sharding then gives
    each its contiguous slices, tests/test_samplers.py)."""
    from ltrainer.data_pipelines.samplers import build_sampler
    labels = [0] * 12 + [1] * 3 + [2]
    one = build_sampler("progressive", labels, batch_size=4, num_epochs=3, seed=1)
    ranks = [build_sampler("progressive", labels, batch_size=2, world_size=2, rank=r,
                           num_epochs=3, seed=1) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(1)
    assert all(torch.equal(r.global_order(), one.global_order()) for r in ranks)
    assert sorted(i for r in ranks for i, _ in r) == sorted(i for i, _ in one)


# --------------------------------------------------------------------------- timm backbones

def test_timm_names_are_checked_with_the_config():
    pytest.importorskip("timm")
    cfg = load_config(CE, ["model.name=timm/test_vit"])
    assert cfg.model.name == "timm/test_vit"
    with pytest.raises(ConfigError, match=r"model\.name = 'timm/test_vti': timm .* has no "
                                          r"model 'test_vti'; did you mean timm/test_vit"):
        load_config(CE, ["model.name=timm/test_vti"])
    with pytest.raises(ConfigError, match="unknown model|one of"):
        load_config(CE, ["model.name=timm/"])          # the family needs a name after it


def test_missing_timm_is_one_clear_line(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "timm", None)      # import timm raises ImportError
    with pytest.raises(ConfigError, match=r"model\.name = 'timm/\.\.\.' needs timm, which "
                                          r"cannot be imported .*: pip install timm"):
        load_config(CE, ["model.name=timm/test_vit"])


@pytest.mark.parametrize("name, classifier", [("test_vit", "head"), ("test_resnet", "fc"),
                                              ("test_convnext", "head.fc")])
def test_timm_backbone_with_our_heads_loads_a_local_timm_file_and_exports(tmp_path, name,
                                                                          classifier):
    """A timm file (as saved from timm.create_model(..., pretrained=True) elsewhere) starts
    the backbone through model.init; its classifier is dropped, or loaded with init_head;
    the export loads strictly into timm's own model and gives the same logits."""
    timm = pytest.importorskip("timm")
    from ltrainer.trainer.models import create_model, export_torchvision_state_dict
    from ltrainer.trainer.transfer import load_pretrained
    src = timm.create_model(name, pretrained=False, num_classes=5, in_chans=1, img_size=32) \
        if "vit" in name else timm.create_model(name, pretrained=False, num_classes=5, in_chans=1)
    torch.save(src.state_dict(), tmp_path / "timm.pth")
    for head in ("linear", "cosine"):
        model = create_model(f"timm/{name}", 5, in_channels=1, head=head, image_size=32)
        assert model.backbone.classifier_name == classifier
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
        msg = load_pretrained(model, str(tmp_path / "timm.pth"))
        theirs = src.state_dict()
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, theirs[k]), k
    model = create_model(f"timm/{name}", 5, in_channels=1, image_size=32)
    msg = load_pretrained(model, str(tmp_path / "timm.pth"), with_head=True)
    assert "and the classifier" in msg
    assert torch.equal(model.head.fc.weight, src.state_dict()[f"{classifier}.weight"])
    model.eval()
    src.eval()
    x = torch.randn(3, 1, 32, 32)
    back = timm.create_model(name, pretrained=False, num_classes=5, in_chans=1,
                             **({"img_size": 32} if "vit" in name else {}))
    back.load_state_dict(export_torchvision_state_dict(model), strict=True)
    back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
        torch.testing.assert_close(src(x), model(x))


# ------------------------------------------------- per-class / per-image, last / best epoch

def _evaluation(true, pred, counts):
    from ltrainer.trainer.metrics import evaluate_predictions
    return evaluate_predictions(pred, true, len(counts), counts, many=100, few=20)


def test_per_class_and_per_image_accuracy_by_hand():
    """Train counts [200, 50, 5]: one class per shot. Evaluated: class 0 (many) 4 images, 3
    right; class 1 (medium) 1 image, right; class 2 (few) 2 images, 0 right. Per image 4/7;
    per class (75 + 100 + 0) / 3; a shot with one class is the same both ways."""
    from ltrainer.trainer.results import accuracy_report
    m = _evaluation([0, 0, 0, 0, 1, 2, 2], [0, 0, 0, 1, 1, 0, 1], [200, 50, 5])
    r = accuracy_report(m, [200, 50, 5])
    assert r["per_image"]["all"] == pytest.approx(400 / 7)
    assert r["per_class"]["all"] == pytest.approx(175 / 3)
    assert (r["per_class"]["many"], r["per_class"]["medium"], r["per_class"]["few"]) == \
        pytest.approx((75, 100, 0))
    assert r["per_image"]["many"] == pytest.approx(75)
    assert r["shot_thresholds"] == {"many": "> 100 training images",
                                    "medium": "20-100 training images",
                                    "few": "< 20 training images"}
    assert r["shot_classes"] == {"many": 1, "medium": 1, "few": 1} and r["images"] == 7
    # two many-shot classes: per class averages their accuracies, per image pools the images
    m = _evaluation([0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [200, 300, 5])
    r = accuracy_report(m, [200, 300, 5])
    assert r["per_class"]["many"] == pytest.approx(37.5)
    assert r["per_image"]["many"] == pytest.approx(60.0)
    assert r["per_image"]["few"] is None and r["per_class"]["few"] is None


def test_results_report_test_at_the_last_and_at_the_best_val_epoch():
    from ltrainer.trainer.protocol import EpochSelection
    counts = [200, 50, 5]
    cfg = load_config(CE, ["data.val_per_class=5"])
    sel = EpochSelection(cfg, counts)
    assert sel.split == "val" and sel.note is None
    good, bad = _evaluation([0, 1, 2], [0, 1, 2], counts), _evaluation([0, 1, 2], [0, 0, 0], counts)
    sel.record(10, good, val=good)          # best on val at epoch 10
    sel.record(20, bad, val=bad)
    sel.record(30, bad, val=good)           # equal val: the earliest stays
    out = sel.results(30, bad)
    last, best = out["test_last_epoch"], out["test_best_val_epoch"]
    assert last["label"] == "test at the last epoch (30)" and last["per_class"]["all"] == \
        pytest.approx(100 / 3)
    assert best["epoch"] == 10 and best["per_class"]["all"] == 100.0
    assert best["label"] == ("test at the best-validation epoch (10, chosen on 'val' balanced "
                             "accuracy)")
    again = EpochSelection(cfg, counts)     # resumed: the state carries the choice
    again.load_state_dict(sel.state_dict())
    assert again.results(30, bad) == out
    # no validation split: only the last epoch, and the reason
    plain = EpochSelection(load_config(CE), counts)
    plain.record(10, good, val=None)
    best = plain.results(10, good)["test_best_val_epoch"]
    assert "not selected" in best["label"] and "no validation split" in best["why"]
    with pytest.raises(ConfigError, match=r"eval\.best_on = 'test'"):
        load_config(CE, ["eval.best_on=test"])


def test_inat_best_epoch_on_its_only_held_out_split_is_said():
    from ltrainer.trainer.protocol import EpochSelection
    cfg = load_config(CE, LIST + ["data.val_list=v", "data.test_list=null", "eval.split=val"])
    sel = EpochSelection(cfg, [200, 50, 5])
    m = _evaluation([0, 1, 2], [0, 1, 2], [200, 50, 5])
    sel.record(5, m, val=m)
    best = sel.results(5, m)["val_best_val_epoch"]
    assert "no validation split apart from it" in best["note"]


# ------------------------------------------------------------------------ weight balancing

def test_max_norm_radius_and_projection_by_hand():
    """Class norms 5, 1 and 0.5 (rows [3, 4], [0.6, 0.8], [0, 0.5]): threshold 0.1 gives the
    radius 0.5 + 0.1 x 4.5 = 0.95; projected, row 0 becomes [0.57, 0.76] (norm 0.95), row 1
    [0.57, 0.76] too (norm 1 > 0.95), row 2 is inside and stays."""
    from ltrainer.trainer.methods.weight_balancing import max_norm_radius, project_max_norm
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.5]])
    r = max_norm_radius(w, 0.1)
    assert r == pytest.approx(0.95)
    project_max_norm(w, r)
    assert torch.allclose(w, torch.tensor([[0.57, 0.76], [0.57, 0.76], [0.0, 0.5]]), atol=1e-5)


def test_weight_balancing_projects_after_every_step_and_weighs_by_class(tmp_path):
    from ltrainer.trainer.losses import class_balanced_weights
    from ltrainer.trainer.methods import create_method
    from ltrainer.trainer.models import create_model
    init = tmp_path / "init.pt"
    model = create_model("mlp", 3, in_channels=1, image_size=28)
    with torch.no_grad():
        model.head.fc.weight.mul_(torch.tensor([[10.0], [1.0], [0.1]]))
    torch.save(model.state_dict(), init)
    cfg = load_config(CE, ["method.name=weight_balancing", f"model.init={init}", "model.name=mlp",
                           "model.init_head=true", "max_norm.threshold=0.2"])
    data = types.SimpleNamespace(class_counts=[50, 10, 2], num_classes=3, in_channels=1)
    method = create_method(cfg, data, torch.device("cpu"))
    norms = model.head.fc.weight.detach().norm(dim=1)
    assert method.radius == pytest.approx(float(norms.min() + 0.2 * (norms.max() - norms.min())),
                                          rel=1e-6)
    assert torch.allclose(method.loss.class_weights, class_balanced_weights([50, 10, 2]))
    method.on_step_end(method.model.head, ctx=None)
    after = method.model.head.fc.weight.norm(dim=1)
    assert after.max() <= method.radius * (1 + 1e-6)
    assert torch.isclose(after[2], norms[2])        # the small class is inside the ball
    assert not any(p.requires_grad for p in method.model.backbone.parameters())


# ------------------------------------------------------------------------------ weight EMA

def test_ema_update_by_hand_and_as_the_per_tensor_loop():
    """decay 0.75: [1, 2] toward [3, 6] gives [1.5, 3]; BatchNorm statistics stay the
    target's own ('own') or are averaged too ('average', num_batches_tracked copied); the
    fused update equals the per-tensor loop the methods used, bit for bit."""
    from ltrainer.trainer.ema import ema_update, frozen_copy, warmup_decay
    src = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    tgt = frozen_copy(src)
    with torch.no_grad():
        tgt[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        src[0].weight.copy_(torch.tensor([[3.0, 6.0]]))
        src[1].running_mean.fill_(4.0)
        src[1].num_batches_tracked.fill_(7)
    assert not any(p.requires_grad for p in tgt.parameters())
    ema_update(tgt, src, 0.75)
    assert tgt[0].weight.tolist() == [[1.5, 3.0]]
    assert tgt[1].running_mean.item() == 0.0 and tgt[1].num_batches_tracked.item() == 0
    ema_update(tgt, src, 0.75, buffers="average")
    assert tgt[1].running_mean.item() == 1.0 and tgt[1].num_batches_tracked.item() == 7
    assert [warmup_decay(s, 0.99) for s in (0, 1, 98, 500)] == \
        pytest.approx([0.5, 2 / 3, 0.99, 0.99])
    g = torch.Generator().manual_seed(0)
    a = nn.Linear(7, 5)
    b, ref = frozen_copy(a), frozen_copy(a)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    for _ in range(3):
        ema_update(b, a, 0.999)
        with torch.no_grad():
            for t, s in zip(ref.parameters(), a.parameters()):
                t.mul_(0.999).add_(s.detach(), alpha=1 - 0.999)
    for t, r in zip(b.parameters(), ref.parameters()):
        assert torch.equal(t, r)


# ------------------------------------------------------------------- gradient accumulation

def _grads_after(model, batch, chunks):
    from ltrainer.trainer.accumulate import accumulated_step
    from ltrainer.trainer.methods.base import Batch
    model.zero_grad(set_to_none=True)

    def forward(micro):
        loss = torch.nn.functional.cross_entropy(model(micro.images), micro.labels)
        return loss, {"loss": loss.detach()}

    loss, logs = accumulated_step(forward, lambda l: l.backward(), Batch(*batch), chunks)
    return loss, logs, [p.grad.clone() for p in model.parameters()]


def test_accumulated_gradients_equal_the_large_batch_without_batchnorm():
    """An MLP (no BatchNorm): 4 micro-batches of 6 (and uneven ones of 6/6/5/5) give the
    gradient and loss of the batch of 24. ResNet-8 (BatchNorm) does not: each micro-batch is
    normalised with its own statistics."""
    from ltrainer.trainer.models import create_model
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    mlp = create_model("mlp", 3, in_channels=1, image_size=8)
    loss1, _, big = _grads_after(mlp, (x, y), 1)
    loss4, logs, small = _grads_after(mlp, (x, y), 4)
    assert torch.allclose(loss1, loss4, atol=1e-6) and torch.allclose(logs["loss"], loss1)
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    from ltrainer.trainer.accumulate import micro_batches
    from ltrainer.trainer.methods.base import Batch
    assert [m.images.shape[0] for m in micro_batches(Batch(x[:22], y[:22]), 4)] == [6, 6, 5, 5]
    _, _, big22 = _grads_after(mlp, (x[:22], y[:22]), 1)
    _, _, acc22 = _grads_after(mlp, (x[:22], y[:22]), 4)
    for a, b in zip(big22, acc22):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    bn = create_model("resnet8", 3, in_channels=1)
    _, _, big = _grads_after(bn, (x, y), 1)
    _, _, small = _grads_after(bn, (x, y), 4)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(big, small))


def test_accumulation_is_refused_where_a_step_keeps_state():
    load_config(CE, ["optim.accum_steps=4"])
    with pytest.raises(ConfigError, match=r"optim\.accum_steps = 2: method 'moco' keeps state "
                                          r"per forward pass"):
        load_config(CE, ["optim.accum_steps=2", "method.name=moco"])


@needs_fmnist
def test_results_json_has_the_last_and_the_best_validation_epoch(tiny):
    """3 epochs evaluated each: results.json labels test at the last epoch and at the epoch
    whose val balanced accuracy was best (metrics.jsonl holds every evaluation to check it),
    with per-class and per-image accuracy and the shot thresholds."""
    import json
    from ltrainer.trainer.engine import train
    cfg = load_config(CE, tiny + ["run.name=sel", "data.val_per_class=10"])
    res = train(cfg)
    run = os.path.join(cfg.run.out_dir, "sel")
    evals = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))
             if '"eval_' in line]
    val = {r["epoch"]: r["balanced_top1"] for r in evals if r["kind"] == "eval_val"}
    test = {r["epoch"]: r["balanced_top1"] for r in evals if r["kind"] == "eval_test"}
    assert sorted(val) == sorted(test) == [1, 2, 3]
    best = res["test_best_val_epoch"]
    assert best["epoch"] == min(e for e in val if val[e] == max(val.values()))
    assert best["per_class"]["all"] == pytest.approx(test[best["epoch"]])
    last = res["test_last_epoch"]
    assert last["label"] == "test at the last epoch (3)"
    assert last["per_class"]["all"] == pytest.approx(res["balanced_top1"])
    assert last["per_image"]["all"] == pytest.approx(res["top1"])
    assert last["shot_thresholds"]["few"] == "< 20 training images"


@needs_fmnist
def test_post_hoc_logit_adjustment_and_weight_balancing_run_on_a_ce_model(tiny):
    """A CE run, then post-hoc LA through the engine: tau from the val split, results.json
    says where, and model_final.pt is the CE classifier with -tau log pi added to its bias;
    then weight balancing from it: every class norm within the MaxNorm radius, the backbone
    (weights and BatchNorm statistics) unchanged."""
    from ltrainer.trainer.engine import train
    ce = load_config(CE, tiny + ["run.name=ce", "sched.epochs=1", "sched.warmup_epochs=0",
                                 "data.val_per_class=10"])
    train(ce)
    run = os.path.join(ce.run.out_dir, "ce")
    cfg = load_config(CE, tiny + ["run.name=la", "data.val_per_class=10", *POSTHOC,
                                  f"model.init={run}", "logit_adjust.grid=[0.0, 1.0, 2.0]"])
    res = train(cfg)
    assert res["tau_selected_on"] == "val" and set(res["tau_search"]) == {"0", "1", "2"}
    assert res["tau_search"][f"{res['tau']:g}"] == max(res["tau_search"].values())
    init = torch.load(os.path.join(run, "model_final.pt"), weights_only=True)
    final = torch.load(os.path.join(cfg.run.out_dir, "la", "model_final.pt"), weights_only=True)
    from ltrainer.trainer.methods.logit_adjust import log_prior
    from ltrainer.trainer.results import load_per_class
    prior = log_prior(load_per_class(os.path.join(cfg.run.out_dir, "la"))["class_counts"].tolist())
    torch.testing.assert_close(final["head.fc.bias"], init["head.fc.bias"] - res["tau"] * prior)
    torch.testing.assert_close(final["head.fc.weight"], init["head.fc.weight"])
    # weight balancing's second stage from the same CE run: one epoch, MaxNorm after every step
    wb = load_config(CE, tiny + ["run.name=wb", "method.name=weight_balancing",
                                 f"model.init={run}", "model.init_head=true", "sched.epochs=1",
                                 "sched.warmup_epochs=0", "optim.weight_decay=0.1"])
    res = train(wb)
    final = torch.load(os.path.join(cfg.run.out_dir, "wb", "model_final.pt"), weights_only=True)
    norms = final["head.fc.weight"].norm(dim=1)
    assert float(norms.max()) <= res["max_norm_radius"] * (1 + 1e-5)
    for k, v in init.items():
        if k.startswith("backbone."):
            assert torch.equal(v, final[k]), k


def test_mean_teacher_and_moco_use_the_one_ema():
    """The teacher and the key encoder are trainer/ema.py's frozen copies, updated by its
    ema_update (test_moco / test_semi check their formulas through it)."""
    from ltrainer.trainer import ema
    from ltrainer.trainer.methods import mean_teacher, moco
    assert mean_teacher.ema_update is ema.ema_update and moco.ema_update is ema.ema_update
    assert mean_teacher.frozen_copy is ema.frozen_copy and moco.frozen_copy is ema.frozen_copy


def test_supervised_weight_ema_is_what_is_evaluated_and_saved():
    """ema.decay 0.9 without warm-up: after one step from w0 to w1 the EMA holds
    0.9 w0 + 0.1 w1; predict and final_model use it; ema.decay 0 keeps the raw model."""
    from ltrainer.trainer.methods import create_method
    data = types.SimpleNamespace(class_counts=[5, 5], num_classes=2, in_channels=1)
    cfg = load_config(CE, ["model.name=mlp", "ema.decay=0.9", "ema.warmup=false"])
    method = create_method(cfg, data, torch.device("cpu"))
    w0 = method.model.head.fc.weight.detach().clone()
    with torch.no_grad():
        method.model.head.fc.weight.add_(1.0)
    method.on_step_end(method.model, types.SimpleNamespace(step=0))
    assert torch.allclose(method.ema_model.head.fc.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(method.predict(method.model, x), method.ema_model(x))
    assert method.final_model() is method.ema_model
    assert "ema_model.head.fc.weight" in method.state_dict()     # checkpointed
    plain = create_method(load_config(CE, ["model.name=mlp"]), data, torch.device("cpu"))
    assert plain.ema_model is None and plain.final_model() is plain.model


@needs_fmnist
def test_progressive_sampling_through_the_engine(tiny):
    """train_rule resample + sampler progressive: the method asks for T = sched.epochs and
    the engine's loader draws with the progressively-balanced sampler."""
    from ltrainer.data_pipelines.samplers import ProgressivelyBalancedSampler
    from ltrainer.trainer.engine import Trainer
    cfg = load_config(CE, tiny + ["run.name=pb", "train_rule.name=resample",
                                  "train_rule.sampler=progressive", "sched.epochs=2"])
    trainer = Trainer(cfg)
    choice = trainer.method.on_epoch_start(1)
    assert (choice.kind, choice.num_epochs) == ("progressive", 2)
    res = trainer.fit()
    sampler = trainer.data.train_loader("progressive", 1)[1]
    assert isinstance(sampler, ProgressivelyBalancedSampler) and sampler.num_epochs == 2
    assert res["epochs"] == 2


def test_dry_run_plan_says_what_selects_and_when_it_is_the_reported_split():
    from ltrainer.trainer.methods import METHODS
    from ltrainer.trainer.protocol import describe_selection
    inat = load_config(CE, POSTHOC + LIST + ["data.val_list=v", "data.test_list=null",
                                             "eval.split=val"])
    text = describe_selection(inat, METHODS["logit_adjust"])
    assert text.startswith("chosen on val (logit_adjust.split)")
    assert "NOTE: 'val' is also the reported split" in text and "iNaturalist" in text
    held = load_config(CE, POSTHOC + LIST + ["data.val_list=v", "data.test_list=t"])
    assert describe_selection(held, METHODS["logit_adjust"]) == "chosen on val (logit_adjust.split)"
    plain = load_config(CE, ["data.val_per_class=5"])
    assert describe_selection(plain, METHODS["supervised"]) == \
        "best epoch on val reported beside the last"
    assert describe_selection(load_config(CE), METHODS["supervised"]) == ""


def test_tau_norm_may_not_choose_tau_on_the_reported_split_either():
    with pytest.raises(ConfigError, match=r"tau_norm\.split = 'test' selects on the split the "
                                          r"results report"):
        load_config(CE, ["method.name=tau_norm", "model.init=x", "model.init_head=true",
                         "sched.epochs=0", "sched.warmup_epochs=0", "tau_norm.split=test"])


def test_the_timm_example_config_loads():
    pytest.importorskip("timm")
    cfg = load_config(os.path.join(ROOT, "configs", "imagenet_lt_timm_vit.yaml"),
                      ["data.root=r", "data.train_list=a", "data.val_list=v", "data.test_list=t"])
    assert cfg.model.name == "timm/vit_small_patch16_224" and cfg.data.image_size == 224


# ------------------------------------------------- the ImageNet-LT / iNat configs, --dry-run

@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """One tiny image per class and split of ImageNet-LT (real counts' classes) and iNat 2018,
    laid out as $LTRAINER_DATA expects (tools/make_synthetic_lt.py)."""
    from tests.conftest import run_cli
    root = tmp_path_factory.mktemp("ltrainer_data")
    lists = os.path.join(os.path.dirname(ROOT), "shared", "lists")
    if not os.path.isfile(os.path.join(lists, "ImageNet_LT_train_counts.json")):
        pytest.skip(f"no {lists}/ImageNet_LT_train_counts.json (../shared/lists beside the "
                    f"checkout), as the other list tests skip")
    run_cli("tools/make_synthetic_lt.py", "--out", str(root / "imagenet_lt"), "--profile",
            "imagenet_lt", "--counts", os.path.join(lists, "ImageNet_LT_train_counts.json"),
            "--max-per-class", "1", "--size", "tiny")
    run_cli("tools/make_synthetic_lt.py", "--out", str(root / "inat2018"), "--profile",
            "inat2018", "--max-per-class", "1", "--size", "tiny")
    return str(root)


NEW_CONFIGS = [f"{d}_{m}" for d in ("imagenet_lt", "inat") for m in
               ("logit_adjusted", "posthoc_la", "balanced_softmax", "weight_balancing",
                "ce_pb")] + ["imagenet_lt_timm_vit"]


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_large_configs_pass_dry_run(name, synthetic_data, monkeypatch, capsys):
    if "timm" in name:
        pytest.importorskip("timm")
    from ltrainer.launchers.train import main
    monkeypatch.setenv("LTRAINER_DATA", synthetic_data)
    rc = main([os.path.join(ROOT, "configs", f"{name}.yaml"), "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "dry run: config and data paths are valid" in out.out
    if name == "inat_posthoc_la":          # tau chosen on val, the split iNat reports
        assert "NOTE: 'val' is also the reported split" in out.out
