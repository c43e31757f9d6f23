"""Semi-supervised imbalanced learning: unlabeled pools (rho_U, relevance, exclusions, refusals),
pseudo-label files and their accuracy report, the labeled/unlabeled batch mixing and loss of
self-training, Mean Teacher's EMA, VAT's perturbation, exact resume, the 3-stage pipeline and
the config errors of the `semi` section."""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltrainer.data_pipelines.build import build_data, held_out_val, labeled_split
from ltrainer.data_pipelines.sources import DataError, base_indices
from ltrainer.data_pipelines.unlabeled_pool import (build_pool, image_ids, task_image_ids,
                                           unlabeled_counts)
from tests.conftest import ROOT, needs_fmnist, run_cli
from ltrainer.tools import make_unlabeled_pool as make_pool
from ltrainer.trainer import pseudo_labels
from ltrainer.trainer.config import ConfigError, load_config
from ltrainer.trainer.losses import class_balanced_weights
from ltrainer.trainer.methods.base import Batch
from ltrainer.trainer.ema import ema_update, warmup_decay as ema_decay
from ltrainer.trainer.methods.vat import frozen_buffers, vat_perturbation
from ltrainer.trainer.pipeline import load_plan, run_plan
from ltrainer.trainer.serving import build_method
from ltrainer.trainer.step_context import StepContext

pytestmark = needs_fmnist
CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")
PIPELINE = os.path.join(ROOT, "configs", "fmnist_lt_self_training.yaml")
TRAIN = os.path.join(ROOT, "launchers", "train.py")
CPU = torch.device("cpu")
# a pool as large as the tiny labeled set (403 images), 16 pool images per batch of 32
SMALL_POOL = ["model.name=mlp", "semi.size=1", "semi.rho_u=10", "semi.unlabeled_ratio=0.5"]


def fmnist(*over):
    """The README's Fashion-MNIST-LT task (rho 100, n_max 1000: 2,478 labeled images)."""
    return load_config(CE, list(over))


def fake_pseudo_labels(cfg, path, seed=0):
    """Random but valid pseudo-labels for the pool `cfg` builds, as a pseudo_label stage would
    write them."""
    pool = build_pool(cfg.data, cfg.semi)
    probs = np.random.RandomState(seed).dirichlet(np.ones(pool.num_classes), len(pool))
    pl = pseudo_labels.from_probs(probs, pool.hidden, pool_fingerprint=pool.fingerprint)
    pseudo_labels.save(str(path), pl)
    return pl


def method_for(cfg):
    """(method, data, the engine's unlabeled stream for it) as the engine builds them."""
    data = build_data(cfg.data, eval_splits=())
    method, supply = build_method(cfg, data, CPU)
    return method, data, supply.stream


# ------------------------------------------------------------------------------ pools

@pytest.mark.parametrize("rho_u", [1, 50, 100, 200])
def test_pool_counts_follow_rho_u_in_the_labeled_head_to_tail_order(rho_u):
    cfg = fmnist("semi.size=4", f"semi.rho_u={rho_u}")
    pool = build_pool(cfg.data, cfg.semi)
    s = pool.summary()
    assert s["labeled"]["count"] == 2478 and s["request"]["total"] == 4 * 2478
    want = unlabeled_counts(4 * 2478, 10, rho_u)
    assert s["class_counts"] == want == np.bincount(pool.hidden, minlength=10).tolist()
    assert want[0] / want[-1] == pytest.approx(rho_u, rel=0.05)
    assert want == sorted(want, reverse=True)
    assert 4 * 2478 - 10 <= len(pool) <= 4 * 2478 and s["irrelevant"] == 0
    # the source's true labels agree with the hidden task labels
    assert np.array_equal(pool.source.labels, pool.hidden)
    assert np.array_equal(pool.source.base.labels[pool.source.indices], pool.hidden)


def test_pool_relevance_and_class_order_of_a_five_class_task():
    cfg = fmnist("data.classes=[4,1,0,3,2]", "data.rho=50", "semi.size=4", "semi.rho_u=50",
                 "semi.relevance=0.4")
    pool = build_pool(cfg.data, cfg.semi)
    labeled = pool.summary()["labeled"]["count"]
    total = 4 * labeled
    n_rel = round(0.4 * total)
    hidden = pool.hidden
    assert np.bincount(hidden[hidden >= 0], minlength=5).tolist() == unlabeled_counts(n_rel, 5, 50)
    assert (hidden < 0).sum() == total - n_rel
    base = pool.source.base
    source = np.asarray(base.labels)[pool.source.indices]
    # task class k is source class classes[k], so source class 4 (Coat) is the head
    assert np.array_equal(source[hidden >= 0], np.array([4, 1, 0, 3, 2])[hidden[hidden >= 0]])
    outside = np.bincount(source[hidden < 0], minlength=10)
    assert outside[[0, 1, 2, 3, 4]].sum() == 0 and set(outside[5:]) <= {(total - n_rel) // 5,
                                                                       (total - n_rel) // 5 + 1}


def test_impossible_request_is_refused_naming_each_short_class(tmp_path, capsys):
    cfg = fmnist("semi.size=5", "semi.rho_u=200")
    with pytest.raises(DataError, match=r"class 0 needs 5528 but only 5000 are available "
                                        r"\(528 missing\)"):
        build_pool(cfg.data, cfg.semi)
    cfg = fmnist("data.classes=[0,1,2,3,4]", "semi.relevance=0.0", "semi.size=25")
    with pytest.raises(DataError, match=r"source class 5 needs 7285 but only 6000"):
        build_pool(cfg.data, cfg.semi)
    with pytest.raises(DataError, match="semi.split = 'test'"):
        c = fmnist("semi.split=test")
        build_pool(c.data, c.semi)
    assert make_pool.main([CE, "--out", str(tmp_path / "no"), "--size", "5", "--rho-u", "200"]) == 1
    assert "class 0 needs 5528" in capsys.readouterr().err
    assert not (tmp_path / "no" / "pool.json").exists()


def test_pool_excludes_the_long_tailed_subset_and_the_validation_split(tmp_path):
    over = ["data.classes=[0,1]", "data.n_max=1000", "data.rho=10", "data.val_per_class=50",
            "semi.rho_u=1000"]
    cfg = fmnist(*over, "semi.size=5")
    # class 0 keeps 6000 - 1000 (LT) - 50 (val) = 4950 unused images, and no more
    with pytest.raises(DataError, match=r"class 0 \(source class 0\) needs 5494 but only 4950 "
                                        r"are available"):
        build_pool(cfg.data, cfg.semi)
    cfg = fmnist(*over, "semi.size=4")
    pool = build_pool(cfg.data, cfg.semi)
    full, lt = labeled_split(cfg.data)
    spec = pool.parts[0].spec
    lt_ids = image_ids(spec, *base_indices(lt))
    val_ids = image_ids(spec, *base_indices(held_out_val(cfg.data, full, lt)))
    ids = pool.parts[0].ids()
    assert len(lt_ids) == 1100 and len(val_ids) == 100
    assert not np.isin(ids, lt_ids).any() and not np.isin(ids, val_ids).any()
    assert set(task_image_ids(cfg.data)) == set(lt_ids) | set(val_ids)
    # written by the tool and read back: the same pool, checked against the task again
    assert make_pool.main([CE, *over, "--out", str(tmp_path / "pool"), "--size", "4"]) == 0
    summary = json.loads((tmp_path / "pool" / "pool.json").read_text())
    assert summary["fingerprint"] == pool.fingerprint and summary["class_counts"] == \
        np.bincount(pool.hidden, minlength=2).tolist()
    cfg.semi.pool_file = str(tmp_path / "pool" / "pool.json")
    again = build_pool(cfg.data, cfg.semi)
    assert again.fingerprint == pool.fingerprint and np.array_equal(again.hidden, pool.hidden)
    other = fmnist("data.classes=[0,1]", "data.n_max=3000", "data.rho=10",
                   f"semi.pool_file={cfg.semi.pool_file}")
    with pytest.raises(DataError, match="training or evaluation images of this task"):
        build_pool(other.data, other.semi)


def test_pool_from_a_list_file_excludes_training_and_listed_test_images(tmp_path):
    """A 'path label' list of every image (as 'unused ImageNet images' lists often overlap the
    task's own files): the pool keeps neither the long-tailed subset nor the test images."""
    from PIL import Image

    from ltrainer.data_pipelines.unlabeled_pool import pool_files
    lines = {"train": [], "test": []}
    for c in range(3):
        for i in range(40):
            name = f"c{c}/{i}.png"
            (tmp_path / f"c{c}").mkdir(exist_ok=True)
            Image.new("L", (8, 8), color=6 * i + c).save(tmp_path / name)
            lines["train" if i < 30 else "test"].append(f"{name} {c}\n")
    for split, rows in (("train", lines["train"]), ("test", lines["test"]), ("all", None)):
        (tmp_path / f"{split}.txt").write_text("".join(rows or lines["train"] + lines["test"]))
    over = ["data.source=list", f"data.root={tmp_path}", f"data.train_list={tmp_path}/train.txt",
            f"data.test_list={tmp_path}/test.txt", "data.num_classes=3", "data.n_max=20",
            "data.rho=4", "data.stats=imagenet", "semi.source=list", f"semi.list={tmp_path}/all.txt",
            "semi.rho_u=1"]  # a list source names its normalization statistics
    cfg = load_config(None, over + ["semi.size=1"])      # 35 images: 11 per class
    # class 0: 40 listed - 20 in the long-tailed subset - 10 test images = 10
    with pytest.raises(DataError, match="class 0 needs 11 but only 10 are available"):
        build_pool(cfg.data, cfg.semi)
    cfg = load_config(None, over + ["semi.size=0.8"])
    pool = build_pool(cfg.data, cfg.semi)
    assert np.bincount(pool.hidden).tolist() == [9, 9, 9]
    paths = set(pool.parts[0].ids())
    _, lt = labeled_split(cfg.data)
    base, idx = base_indices(lt)
    assert len(idx) == 35 and not paths & {base.full_path(i) for i in idx}
    assert not paths & {str(tmp_path / r.split()[0]) for r in lines["test"]}
    for name, text in pool_files(pool).items():
        (tmp_path / name).write_text(text)
    assert "c0/" in (tmp_path / "pool.relevant.txt").read_text()     # 'path label' lines
    cfg.semi.pool_file = str(tmp_path / "pool.json")
    assert build_pool(cfg.data, cfg.semi).fingerprint == pool.fingerprint


# ------------------------------------------------------------------------------ pseudo-labels

def test_pseudo_label_file_round_trip_selection_and_accuracy_report(tmp_path):
    rng = np.random.RandomState(3)
    n, c = 400, 5
    probs = rng.dirichlet(np.ones(c) * 0.5, n).astype(np.float32)
    hidden = rng.randint(-1, c, n)
    pl = pseudo_labels.from_probs(probs, hidden, threshold=0.3, top_k=25, keep_probs=True,
                                  pool_fingerprint="abc")
    labels, conf = probs.argmax(1), probs.max(1)
    for k in range(c):       # threshold, then the 25 most confident of each class
        ok = np.nonzero((labels == k) & (conf >= 0.3))[0]
        best = ok[np.argsort(-conf[ok], kind="stable")[:25]]
        assert set(np.nonzero(pl.selected & (labels == k))[0]) == set(best)
    path = tmp_path / "pl.npz"
    pseudo_labels.save(str(path), pl)
    back = pseudo_labels.load(str(path))
    for name in ("labels", "confidence", "selected", "hidden", "probs"):
        assert np.array_equal(getattr(back, name), getattr(pl, name)), name
    assert back.meta["pool_fingerprint"] == "abc" and back.num_classes == c
    with np.load(path, allow_pickle=False) as z:          # plain arrays, no pickle
        assert all(z[k].dtype != object for k in z.files)
    rep = pseudo_labels.accuracy_report(back)
    sel = pl.selected
    for k, row in enumerate(rep["per_class"]):
        mine = sel & (hidden == k)
        assert row["selected"] == mine.sum() and row["in_pool"] == (hidden == k).sum()
        assert row["accuracy"] == pytest.approx(100 * (labels[mine] == k).mean())
        assigned = sel & (labels == k)
        assert row["precision"] == pytest.approx(100 * (hidden[assigned] == k).mean())
    rel = sel & (hidden >= 0)
    assert rep["accuracy"] == pytest.approx(100 * (labels[rel] == hidden[rel]).mean())
    assert rep["outside_task"] == (sel & (hidden < 0)).sum()
    assert "accuracy on the task's images" in pseudo_labels.format_report(rep)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: cannot be read"):
        pseudo_labels.load(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------------------ self-training

def test_mixed_batch_holds_both_sources_at_the_configured_ratio(tiny, tmp_path):
    cfg = load_config(CE, tiny + SMALL_POOL + ["method.name=self_training",
                                               f"semi.pseudo_labels={tmp_path / 'pl.npz'}"])
    pl = fake_pseudo_labels(cfg, tmp_path / "pl.npz")
    method, data, stream = method_for(cfg)
    method.on_epoch_start(0)
    images, labels = next(iter(data.train_loader("uniform", 0)[0]))
    seen = []

    def model(x):
        seen.append(x)
        return method.model(x)

    method.training_step(model, Batch(images, labels, *stream.next()), StepContext())
    batch = seen[0]
    assert batch.shape[0] == 32 + 16                   # semi.unlabeled_ratio 0.5 x batch 32
    assert torch.equal(batch[:32], images)
    sampler = data._loaders[("unlabeled",)][1]
    keys = list(iter(sampler))[:16]
    pool_images = torch.stack([stream.dataset[k][0] for k in keys])
    assert torch.equal(batch[32:], pool_images)
    rows = np.array([k[0] for k in keys])
    assert np.array_equal(stream.dataset.source.labels[rows], pl.labels[rows])  # pseudo, not true
    pool_ids = image_ids(method.pool.parts[0].spec, *base_indices(stream.dataset.source))[rows]
    assert not np.isin(pool_ids, task_image_ids(cfg.data)).any()     # really pool images
    assert stream.state_dict() == {"unlabeled_epoch": 0, "unlabeled_batch": 1}


def test_omega_weighted_loss_equals_a_hand_computation(tiny, tmp_path):
    cfg = load_config(CE, tiny + SMALL_POOL + [
        "method.name=self_training", f"semi.pseudo_labels={tmp_path / 'pl.npz'}",
        "semi.omega=0.7", "train_rule.name=reweight"])
    pl = fake_pseudo_labels(cfg, tmp_path / "pl.npz")
    method, data, stream = method_for(cfg)
    counts = np.asarray(data.class_counts) + np.bincount(pl.labels, minlength=10)
    assert method.loss_counts() == counts.tolist()              # semi.counts: combined
    method.on_epoch_start(0)
    images, labels = next(iter(data.train_loader("uniform", 0)[0]))
    loss, logs = method.training_step(method.model, Batch(images, labels, *stream.next()),
                                      StepContext())
    stream.load_state_dict({"unlabeled_epoch": 0, "unlabeled_batch": 0})
    u_images, u_labels = stream.next()
    with torch.no_grad():
        logits = method.model(torch.cat([images, u_images]))
    w = class_balanced_weights(counts.tolist(), 0.9999)
    hand = (F.cross_entropy(logits[:32], labels, weight=w)
            + 0.7 * F.cross_entropy(logits[32:], u_labels, weight=w))
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert logs["loss_u"].item() == pytest.approx(
        F.cross_entropy(logits[32:], u_labels, weight=w).item(), rel=1e-5)


def test_self_training_killed_runs_resume_to_identical_weights(tiny, tmp_path):
    """36 steps of 16 pool images walk past the end of the 398-image pool (24 batches), so the
    kills land before and after the pool's own epoch boundary."""
    from ltrainer.trainer.engine import train
    over = [*tiny, *SMALL_POOL, "method.name=self_training",
            f"semi.pseudo_labels={tmp_path / 'pl.npz'}", "checkpoint.every_steps=4"]
    fake_pseudo_labels(load_config(CE, over), tmp_path / "pl.npz")
    train(load_config(CE, over + ["run.name=ref"]))
    for k in (6, 27):
        proc = run_cli(TRAIN, CE, *over, "run.name=killed", env={"LTT_KILL_AT_STEP": str(k)},
                       check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    train(load_config(CE, over + ["run.name=killed"]))
    assert "resumed from" in (tmp_path / "killed" / "run.log").read_text()
    wa = torch.load(tmp_path / "ref" / "model_final.pt", weights_only=True)
    wb = torch.load(tmp_path / "killed" / "model_final.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = torch.load(tmp_path / "ref" / "checkpoint_last.pt", weights_only=True)["unlabeled"]
    assert state == {"unlabeled_epoch": 1, "unlabeled_batch": 36 - 24}
    losses = lambda d: [json.loads(line).get("loss_u") for line in
                        (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert losses("ref") == losses("killed")


@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_self_training_runs_with_the_accelerated_loaders(backend, tiny, tmp_path):
    """The pool's batches come through the same loader interface as the labeled ones, with
    its pseudo-labels (not the hidden true labels) as targets."""
    from ltrainer.data_pipelines.loaders import backend_status
    from ltrainer.trainer.engine import train
    if not backend_status(backend)[0]:
        pytest.skip(f"{backend} is not installed")
    over = [*tiny, *SMALL_POOL, "method.name=self_training", "engine.max_steps=3",
            "engine.log_every=1",
            f"semi.pseudo_labels={tmp_path / 'pl.npz'}", f"data.loader={backend}",
            f"data.beton_dir={tmp_path / 'betons'}", "run.name=run"]
    cfg = load_config(CE, over)
    pl = fake_pseudo_labels(cfg, tmp_path / "pl.npz")
    method, data, stream = method_for(cfg)
    _, u_labels = stream.next()
    first = np.nonzero(pl.selected)[0]
    assert u_labels.dtype == torch.int64 and len(u_labels) == 16
    assert set(u_labels.tolist()) <= set(pl.labels[first].tolist())
    train(cfg)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss_u" in r][-1] == 3
    assert all(np.isfinite(r["loss_u"]) for r in logs if "loss_u" in r)


def test_three_stage_pipeline_labels_pseudo_labels_both(tiny, tmp_path):
    over = [o for o in tiny if not o.startswith("sched.")] + SMALL_POOL + [
        "labels.sched.epochs=1", "both.sched.epochs=1", "sched.warmup_epochs=0",
        "sched.milestones=[]", "eval.every_epochs=0"]
    plan = load_plan(PIPELINE, over)
    by = {s.name: s for s in plan}
    assert by["both"].cfg.semi.pseudo_labels == os.path.join(by["pseudo"].run_dir,
                                                             "pseudo_labels.npz")
    res = run_plan(plan)
    pl = pseudo_labels.load(by["both"].cfg.semi.pseudo_labels)
    rep = res["pseudo"]["pseudo_labels"]
    assert rep == json.loads(json.dumps(pseudo_labels.accuracy_report(pl)))
    assert res["both"]["semi"]["pool"]["fingerprint"] == pl.meta["pool_fingerprint"]
    assert res["pseudo"]["balanced_error"] == res["labels"]["balanced_error"]   # same model
    # the command-line tool on the same checkpoint: the same labels
    out = tmp_path / "cli.npz"
    from ltrainer.trainer.banks.label_pool import label_run
    report = label_run(by["labels"].run_dir, str(out), progress=False)
    cli = pseudo_labels.load(str(out))
    assert np.array_equal(cli.labels, pl.labels) and report == pseudo_labels.accuracy_report(cli)
    assert np.allclose(cli.confidence, pl.confidence, atol=1e-5)
    assert not os.path.exists(str(tmp_path / "cli.probs_bank"))


# ------------------------------------------------------------------------------ consistency

def test_mean_teacher_ema_update(tiny):
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, a, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(t, 0.9 * a + 0.1 * s)
    assert [ema_decay(s, 0.99) for s in (0, 1, 8, 1000)] == [0.5, 1 - 1 / 3, 0.9, 0.99]
    cfg = load_config(CE, tiny + SMALL_POOL + ["method.name=mean_teacher", "semi.ema_decay=0.95"])
    method, _, _ = method_for(cfg)
    before = [p.detach().clone() for p in method.teacher.parameters()]
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.on_step_end(method.model, StepContext(step=100))
    for t, a, s in zip(method.teacher.parameters(), before, method.model.parameters()):
        assert torch.allclose(t, 0.95 * a + 0.05 * s)
        assert not t.requires_grad
    assert method.final_model() is method.teacher
    assert any(k.startswith("teacher.") for k in method.state_dict())   # a submodule


def test_vat_perturbation_has_norm_eps_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 4))
    x = torch.randn(5, 1, 3, 3)
    target = F.softmax(model(x), 1).detach()
    g = torch.Generator().manual_seed(1)
    r = vat_perturbation(model, x, target, xi=1e-6, eps=0.5, generator=g)
    assert r.shape == x.shape and not r.requires_grad
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((5,), 0.5), atol=1e-5)
    r2 = vat_perturbation(model, x, target, 1e-6, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(r, r2)                           # seeded: a resumed run repeats it
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    stats = [b.clone() for b in bn.buffers()]
    with frozen_buffers(bn):
        bn(torch.randn(4, 1, 3, 3) * 5)
    assert all(torch.equal(a, b) for a, b in zip(stats, bn.buffers()))


@pytest.mark.parametrize("name", ["mean_teacher", "vat"])
def test_consistency_methods_train_through_the_engine(tiny, tmp_path, name):
    from ltrainer.trainer.engine import train
    cfg = load_config(CE, tiny + SMALL_POOL + [f"method.name={name}", "engine.max_steps=3",
                                               f"run.name={name}", "semi.rampup_epochs=2",
                                               "engine.log_every=1"])
    res = train(cfg)
    assert res["global_step"] == 3 and res["semi"]["unlabeled_per_batch"] == 16
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == 3 and all(np.isfinite(r["loss_u"]) for r in train_records)


# ------------------------------------------------------------------------------ config errors

@pytest.mark.parametrize("over, message", [
    (["method.name=self_training"], r"semi.pseudo_labels = None is not set"),
    (["semi.pseudo_labels=x.npz"], r"only read by method 'self_training'"),
    (["semi.relevance=1.5"], r"semi.relevance = 1.5 must lie in \[0, 1\]"),
    (["semi.rho_u=0.5"], r"semi.rho_u = 0.5 must be >= 1"),
    (["semi.omegaa=1"], r"unknown key 'semi.omegaa'; did you mean 'semi.omega'"),
    (["method.name=vat", "semi.relevance=0.5"], r"semi.relevance = 0.5 draws .* set data.classes"),
    (["method.name=mean_teacher", "semi.unlabeled_ratio=0.001"], r"no pool image per batch"),
    (["method.name=vat", "semi.source=list"], r"semi.source = 'list' needs semi.list"),
    (["method.name=pseudo_label"], r"set model.init .* and model.init_head: true"),
    (["method.name=pseudo_label", "model.init=x", "model.init_head=true"], r"set sched.epochs: 0"),
    (["data.classes=[1,1]"], r"data.classes = \[1, 1\] must list at least two distinct"),
    (["semi.counts=all"], r"semi.counts = 'all' is not allowed; expected one of 'combined'"),
])
def test_config_errors_name_the_semi_key(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CE, over)


def test_pipeline_reference_to_pseudo_labels_must_name_an_earlier_stage(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - name: a\n    method: {name: self_training}\n"
                    "    semi: {pseudo_labels: '@b'}\n  - name: b\n")
    with pytest.raises(ConfigError, match=r"semi.pseudo_labels = '@b' must name an earlier stage"):
        load_plan(str(path))
