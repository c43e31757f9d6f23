"""Issue 13: each place where the reference code differs from the paper or from our earlier
default is an option; every test here checks one against a computation by hand on tiny inputs
(docs/fidelity.md lists them)."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ltrainer.data_pipelines.samplers import ClassAwareCyclicSampler, build_sampler
from ltrainer.trainer.config import ConfigError, load_config
from ltrainer.trainer.losses import create_loss
from ltrainer.trainer.models import LinearHead, create_model
from ltrainer.trainer.schedules import lr_factor

# --------------------------------------------------------------- 1. class-aware cyclic sampler
# 4 classes with items (class 3 has none): sizes 4, 2, 1, 3; max_count 4.
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 4, 4, 4])


def test_cyclic_sampler_visits_classes_in_passes_with_consecutive_draws():
    s = build_sampler("class_aware_cyclic", LABELS, batch_size=2, seed=3, samples_per_class=2)
    order = s.global_order(0).numpy()
    assert len(order) == 16                          # max_count 4 x 4 classes
    y = LABELS[order]
    visits = y.reshape(8, 2)
    assert (visits[:, 0] == visits[:, 1]).all()      # 2 consecutive images per visit
    for p in visits[:, 0].reshape(2, 4):             # each pass of 4 visits: every class once
        assert sorted(p.tolist()) == [0, 1, 2, 4]
    assert np.bincount(y, minlength=5).tolist() == [4, 4, 4, 0, 4]   # exactly max_count each
    later = LABELS[s.global_order(1).numpy()]                         # in every epoch
    assert np.bincount(later, minlength=5).tolist() == [4, 4, 4, 0, 4]
    for c, members in ((0, [0, 1, 2, 3]), (1, [4, 5]), (2, [6]), (4, [7, 8, 9])):
        draws = order[y == c]                        # class list cycles: each round a shuffle
        n = len(members)
        for r in range(len(draws) // n):
            assert sorted(draws[r * n:(r + 1) * n].tolist()) == members
    assert order[y == 2].tolist() == [6, 6, 6, 6]


def test_cyclic_sampler_epochs_continue_one_stream():
    """The reference's iterators live across epochs: epochs 0-2 of 7 samples (a visit cut at
    each boundary) are the first 21 samples of one stream."""
    a = ClassAwareCyclicSampler(LABELS, 2, 7, batch_size=1, seed=5)
    b = ClassAwareCyclicSampler(LABELS, 2, 21, batch_size=1, seed=5)
    joined = np.concatenate([a.global_order(e).numpy() for e in range(3)])
    assert joined.tolist() == b.global_order(0).tolist()
    assert not np.array_equal(a.global_order(0).numpy(), a.global_order(1).numpy())


def test_cyclic_sampler_epoch_length_and_ranks():
    s = build_sampler("class_aware_cyclic", LABELS, batch_size=2, seed=1, samples_per_class=4,
                      class_aware_epoch="dataset")
    assert len(s.global_order(0)) == 10 and s.num_batches == 5   # N, as the reference's loop
    single = build_sampler("class_aware_cyclic", LABELS, batch_size=4, seed=1,
                           samples_per_class=2)
    single.set_epoch(2)
    one = [i for i, _ in single]
    parts = []
    for r in range(2):
        t = build_sampler("class_aware_cyclic", LABELS, batch_size=2, world_size=2, rank=r,
                          seed=1, samples_per_class=2)
        t.set_epoch(2)
        parts.append([i for i, _ in t])
    merged = [x for b in range(len(parts[0]) // 2) for r in range(2) for x in parts[r][2 * b:2 * b + 2]]
    assert merged == one


def test_sampler_keys_are_config():
    cfg = load_config(None, ["data.samples_per_class=4", "data.class_aware_epoch=dataset",
                             "classifier.sampler=class_aware_cyclic",
                             "train_rule.sampler=class_aware_cyclic"])
    assert cfg.data.samples_per_class == 4
    with pytest.raises(ConfigError, match="data.samples_per_class"):
        load_config(None, ["data.samples_per_class=0"])


# ---------------------------------------------------------------------------- 2. warm-up
def _sched(kind, warm=5):
    return SimpleNamespace(warmup=kind, warmup_epochs=warm, name="constant")


def test_warmup_per_epoch_as_ldam_drw():
    # LDAM-DRW's adjust_learning_rate: lr * (epoch + 1) / 5 for the first 5 epochs.
    got = [lr_factor(_sched("per_epoch"), 0.1, e, s, 10) for e in range(6) for s in (0, 9)]
    assert got == pytest.approx([0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0, 1.0, 1.0])
    # per step: (epoch + (step + 1) / steps) / warm
    assert lr_factor(_sched("per_step"), 0.1, 0, 0, 10) == pytest.approx(1 / 50)
    assert lr_factor(_sched("per_step"), 0.1, 2, 4, 10) == pytest.approx(2.5 / 5)
    assert load_config(None, ["sched.warmup=per_epoch"]).sched.warmup == "per_epoch"
    with pytest.raises(ConfigError, match="whole number of sched.warmup_epochs"):
        load_config(None, ["sched.warmup=per_epoch", "sched.warmup_epochs=1.5"])


# ------------------------------------------------------------------------ 3. head init
def test_kaiming_normal_head_init():
    torch.manual_seed(0)
    default = LinearHead(64, 2000)
    kaiming = LinearHead(64, 2000, init="kaiming_normal")
    # nn.Linear: U(-1/8, 1/8), std 1/sqrt(3 * 64) = 0.072; kaiming_normal: sqrt(2 / 64) = 0.177
    assert default.fc.weight.std().item() == pytest.approx(1 / math.sqrt(192), rel=0.02)
    assert kaiming.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.02)
    assert kaiming.fc.bias.abs().max().item() <= 1 / 8      # bias keeps nn.Linear's
    kaiming.fc.weight.data.zero_()
    kaiming.reset_parameters()                               # a re-init keeps the choice
    assert kaiming.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.02)
    model = create_model("resnet8", 10, head_init="kaiming_normal")
    assert model.head.init == "kaiming_normal"
    assert create_model("resnet8", 10, head="cosine", head_init="kaiming_normal") is not None


# ------------------------------------------------------------------------- 4. focal form
def test_focal_forms_by_hand():
    logits = torch.zeros(1, 2)                 # p_y = 1/2, CE = ln 2
    target = torch.tensor([0])
    w = torch.tensor([2.0, 1.0])
    ref = create_loss("focal", [5, 5], gamma=1.0, form="reference")
    book = create_loss("focal", [5, 5], gamma=1.0)
    for loss in (ref, book):
        loss.set_class_weights(w)
    # reference: (1 - exp(-w CE)) w CE = (1 - 1/4) 2 ln 2; textbook: w (1 - p) CE = ln 2
    assert ref(logits, target).item() == pytest.approx(1.5 * math.log(2))
    assert book(logits, target).item() == pytest.approx(math.log(2))
    ref.set_class_weights(None)
    assert ref(logits, target).item() == pytest.approx(0.5 * math.log(2))
    cfg = load_config(None, ["loss.name=focal", "loss.focal_form=reference"])
    assert cfg.loss.focal_form == "reference"


# ------------------------------------------------------------------------- 6. tau-norm
def test_tau_logits_without_bias_and_the_reference_grid():
    from ltrainer.trainer.methods.tau_norm import TAU_GRID, tau_logits
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])     # norms 5 and 1
    b = torch.tensor([0.0, 1.0])
    x = torch.tensor([[1.0, 1.0]])
    # tau = 1: rows (0.6, 0.8) and (0, 1): logits 1.4 and 1; + bias: 1.4 and 2
    assert tau_logits(x, w, None, 1.0)[0].tolist() == pytest.approx([1.4, 1.0])
    assert tau_logits(x, w, b, 1.0)[0].tolist() == pytest.approx([1.4, 2.0])
    assert tau_logits(x, w, None, 0.0)[0].tolist() == pytest.approx([7.0, 1.0])
    assert TAU_GRID == pytest.approx(list(np.linspace(0, 2, 21)))   # tau_norm.py's grid
    assert load_config(None).tau_norm.grid == TAU_GRID


# ------------------------------------------------------------------------------ 7. NCM
def test_ncm_centered_l2_by_hand():
    from ltrainer.trainer.methods.ncm import ncm_centroids, ncm_features, ncm_logits
    feats = torch.tensor([[3.0, 1.0], [-1.0, -1.0], [1.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    center = feats.mean(0)                                   # (1, 1)
    x = ncm_features(feats, center)                          # (1, 0), (-r, -r), (0, 1)
    r = 1 / math.sqrt(2)
    assert x.flatten().tolist() == pytest.approx([1, 0, -r, -r, 0, 1])
    sums = torch.zeros(2, 2, dtype=torch.float64).index_add_(0, labels, x.double())
    counts = torch.tensor([2.0, 1.0], dtype=torch.float64)
    c = ncm_centroids(sums, counts, "centered_l2")           # means of the unit vectors
    assert c.flatten().tolist() == pytest.approx([(1 - r) / 2, -r / 2, 0, 1])
    q = ncm_features(torch.tensor([[2.0, 1.5]]), center)     # (1, 0.5) / |.|
    qa, qb = 2 / math.sqrt(5), 1 / math.sqrt(5)
    assert q[0].tolist() == pytest.approx([qa, qb])
    d0 = (qa - (1 - r) / 2) ** 2 + (qb + r / 2) ** 2        # 1.2007: class 1 is nearer
    d1 = qa ** 2 + (qb - 1) ** 2                            # 1.1056
    assert ncm_logits(q, c, "centered_l2")[0].tolist() == pytest.approx([-d0, -d1], abs=1e-6)
    cos = ncm_centroids(sums, counts, "cosine")              # unit-norm directions
    assert cos.norm(dim=1).tolist() == pytest.approx([1, 1])
    assert ncm_logits(q, cos, "cosine")[0].tolist() == pytest.approx((q @ cos.T)[0].tolist())
    assert load_config(None, ["classifier.ncm_metric=centered_l2"]).classifier.ncm_metric \
        == "centered_l2"


# ------------------------------------------------------------------- 5. frozen backbone BN
def test_backbone_bn_option_checks():
    with pytest.raises(ConfigError, match="method 'ncm' does not train"):
        load_config(None, ["method.name=ncm", "model.init=x", "sched.epochs=0",
                           "sched.warmup_epochs=0", "classifier.backbone_bn=train"])
    with pytest.raises(ConfigError, match="set classifier.backbone_bn: eval"):
        load_config(None, ["method.name=crt", "model.init=x", "data.augment=none",
                           "classifier.cache_features=true", "classifier.backbone_bn=train"])
    from ltrainer.trainer.methods.classifier_base import set_backbone_bn
    model = create_model("resnet8", 10)
    set_backbone_bn(model.backbone, "train")
    before = model.backbone.bn1.running_mean.clone()
    with torch.no_grad():
        model.backbone(torch.randn(8, 3, 16, 16) + 3)
    assert not torch.equal(before, model.backbone.bn1.running_mean)   # statistics move
    set_backbone_bn(model.backbone, "eval")
    before = model.backbone.bn1.running_mean.clone()
    with torch.no_grad():
        model.backbone(torch.randn(8, 3, 16, 16) + 3)
    assert torch.equal(before, model.backbone.bn1.running_mean)


def _bn_worker(out):
    from ltrainer.trainer import distributed as dist_utils
    from ltrainer.trainer.methods.classifier_base import average_bn_stats
    info = dist_utils.setup("cpu")
    torch.set_num_threads(1)
    model = create_model("resnet8", 10)
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(info.rank * 2.0)            # rank 0: 0, rank 1: 2
            m.running_var.fill_(1.0 + info.rank)             # 1 and 2
    average_bn_stats(model.backbone)
    torch.save(model.backbone.bn1.state_dict(), f"{out}/bn{info.rank}.pt")


def test_backbone_bn_statistics_averaged_over_ranks(tmp_path):
    """backbone_bn train on 2 gloo processes: after a step every rank holds the mean of the
    ranks' running statistics (1 and 1.5 here), so checkpoints and evaluation agree."""
    from ltrainer.trainer import distributed as dist_utils
    dist_utils.run_local(_bn_worker, 2, {"out": str(tmp_path)})
    for r in range(2):
        bn = torch.load(tmp_path / f"bn{r}.pt", weights_only=True)
        assert torch.equal(bn["running_mean"], torch.ones(16))
        assert torch.equal(bn["running_var"], torch.full((16,), 1.5))


# -------------------------------------------------------- 8. LDAM-DRW / semi-self weights
def _reference_layout(model, head_key: str, cosine: bool) -> dict:
    """Our ResNet-32's weights as LDAM-DRW (head_key 'linear') or imbalanced-semi-self
    ('fc') save them from nn.DataParallel: module.conv1.weight, ..., and NormedLinear's
    weight as (in, out)."""
    sd = {"module." + k[len("backbone."):]: v.clone() for k, v in model.state_dict().items()
          if k.startswith("backbone.")}
    if cosine:
        sd[f"module.{head_key}.weight"] = model.head.weight.detach().t().clone()
    else:
        sd[f"module.{head_key}.weight"] = model.head.fc.weight.detach().clone()
        sd[f"module.{head_key}.bias"] = model.head.fc.bias.detach().clone()
    return {"epoch": 200, "arch": "resnet32", "state_dict": sd,
            "best_acc1": torch.tensor(77.0), "optimizer": {"state": {}, "param_groups": []}}


@pytest.mark.parametrize("head_key", ["linear", "fc"])
@pytest.mark.parametrize("cosine", [True, False])
def test_import_reference_cifar_checkpoints(tmp_path, head_key, cosine):
    from ltrainer.trainer.transfer import load_pretrained
    torch.manual_seed(1)
    head = "cosine" if cosine else "linear"
    theirs = create_model("resnet32", 10, head=head)
    with torch.no_grad():
        for b in theirs.modules():
            if isinstance(b, torch.nn.BatchNorm2d):
                b.running_mean.normal_()
    path = str(tmp_path / "ckpt.pth.tar")
    torch.save(_reference_layout(theirs, head_key, cosine), path)
    ours = create_model("resnet32", 10, head=head)
    msg = load_pretrained(ours, path, with_head=True)
    assert ("LDAM-DRW" in msg) == (head_key == "linear")
    assert ("transposed" in msg) == cosine
    x = torch.randn(4, 3, 32, 32)
    theirs.eval(), ours.eval()
    assert torch.equal(ours(x), theirs(x))
    fresh = create_model("resnet32", 10, head=head)             # the default: backbone only
    assert "classifier" not in load_pretrained(fresh, path)
    assert torch.equal(fresh.eval().backbone(x), theirs.backbone(x))


# ----------------------------------------------------------------------- 9. SVHN n_max
def test_svhn_n_max_defaults_to_the_reference(tmp_path):
    import scipy.io

    from ltrainer.data_pipelines.build import labeled_split
    from ltrainer.data_pipelines.longtail import lt_counts, n_max_for
    assert n_max_for("svhn", None) == 1000 and n_max_for("svhn", 500) == 500
    assert n_max_for("cifar10", None) is None
    want = lt_counts(10, 1000, 100)                   # 1000, 599, ..., 10 (digits 1..9, 0)
    per_digit = {d: want[(d - 1) % 10] + 3 for d in range(10)}
    y = np.concatenate([np.full(n, d) for d, n in per_digit.items()])
    x = np.zeros((32, 32, 3, len(y)), np.uint8)
    scipy.io.savemat(str(tmp_path / "train_32x32.mat"),
                     {"X": x, "y": np.where(y == 0, 10, y).astype(np.uint8)[:, None]})
    data = {"source": "svhn", "root": str(tmp_path), "imbalance": "exp", "rho": 100.0,
            "n_max": None, "lt_seed": 0, "classes": None, "num_classes": None}
    _, lt = labeled_split(data)
    got = np.bincount(np.asarray(lt.labels), minlength=10)
    assert [int(got[d]) for d in [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]] == want
