"""Issue 12, engine side: results that stay small at 8,142 classes, divergence detection,
partial max_steps runs that continue, split-wide reductions per rank (NCM, tau-norm, the
evaluation) equal on 1 and 2 processes, and a pipeline's stage position and ETA."""
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, needs_fmnist, run_cli
from ltrainer.trainer.config import load_config
from ltrainer.trainer.metrics import evaluate_predictions
from ltrainer.trainer.pipeline import Stage, run_plan
from ltrainer.trainer.results import (PER_CLASS, confusion_matrix, describe_class_counts,
                             load_per_class, per_class_accuracy, write_results)

CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")


def test_results_json_stays_small_at_8142_classes(tmp_path):
    """Finding 2: 300 evaluated images of 8,142 classes wrote a 398 MB results.json (the
    dense confusion matrix). Now the JSON holds summaries and the top-20 confused pairs, the
    per-class arrays and the sparse confusion go to a compressed .npz that round-trips."""
    c, rng = 8142, np.random.default_rng(0)
    counts = np.maximum(1, (1000 * 0.998 ** np.arange(c)).astype(int)).tolist()
    labels = rng.integers(0, c, 300)
    preds = np.where(rng.random(300) < 0.5, labels, rng.integers(0, c, 300))
    preds[:30] = 7                                   # a most-confused target
    m = evaluate_predictions(preds, labels, c, counts)
    small = write_results(str(tmp_path), {"name": "inat", "class_counts": counts, **m})
    size = os.path.getsize(tmp_path / "results.json")
    assert size < 1_000_000, size
    assert "per_class_acc" not in small and "confusion" not in small and small["per_class_file"] == PER_CLASS
    assert len(small["most_confused"]) == 20 and small["most_confused"][0]["pred"] == 7
    assert small["class_count_summary"]["classes"] == c
    back = load_per_class(str(tmp_path))
    assert back["class_counts"].tolist() == counts
    assert per_class_accuracy(back) == m["per_class_acc"]          # None <-> NaN
    codes, n = np.unique(labels * c + preds, return_counts=True)   # sparse: no C x C array
    assert np.array_equal(back["confusion_true"] * c + back["confusion_pred"], codes)
    assert np.array_equal(back["confusion_count"], n)
    line = describe_class_counts(counts)
    assert "8142 classes" in line and "median" in line and len(line) < 200


def test_divergence_is_caught_above_the_start_not_only_at_nan():
    """Finding 7: a cRT loss went 25 -> 2e26 without tripping the non-finite check. A loss
    100x its first logged value (or over 1e4) stops, naming the lr used and the batch."""
    from ltrainer.trainer.divergence import Diverged
    from ltrainer.trainer.engine import Trainer
    fake = SimpleNamespace(first_loss=None, epoch=0, step_in_epoch=5, global_step=5,
                           info=SimpleNamespace(enabled=False),
                           cfg=SimpleNamespace(optim=SimpleNamespace(lr=0.2),
                                               data=SimpleNamespace(batch_size=32)))
    Trainer._check_divergence(fake, 25.0, 0.2)
    Trainer._check_divergence(fake, 900.0, 0.2)          # 36x: still training
    with pytest.raises(Diverged, match=r"over 100x its first logged value 25.*lr used 0\.2 "
                                       r"\(optim\.lr = 0\.2\) with data\.batch_size = 32"):
        Trainer._check_divergence(fake, 2600.0, 0.2)
    fake.first_loss = None
    with pytest.raises(Diverged, match="over 10000"):
        Trainer._check_divergence(fake, 2e26, 0.2)       # already huge at the first log
    with pytest.raises(Diverged, match="loss is nan"):
        Trainer._check_divergence(fake, float("nan"), 0.2)


@needs_fmnist
def test_huge_lr_stops_the_run_with_lr_and_batch(tiny):
    proc = run_cli(os.path.join(ROOT, "launchers", "train.py"), CE, *tiny, "run.name=huge_lr",
                   "model.name=mlp", "optim.lr=100000.0", "engine.log_every=1",
                   "engine.max_steps=12", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"^stopped: training diverged: loss .*optim\.lr = 100000\).*"
                     r"data\.batch_size = 32", proc.stderr, re.M), proc.stderr


@needs_fmnist
def test_max_steps_run_is_partial_and_continues(tiny, tmp_path, capsys):
    """Finding 8: engine.max_steps marked the run complete, so a larger budget did nothing."""
    from ltrainer.trainer.engine import train
    over = tiny + ["run.name=smoke", "model.name=mlp", "sched.epochs=2"]
    res = train(load_config(CE, over + ["engine.max_steps=3"]))
    assert res["partial"] is True and res["global_step"] == 3 and res["max_steps"] == 3
    assert os.path.getsize(tmp_path / "smoke" / "results.json") < 20_000
    log = (tmp_path / "smoke" / "run.log").read_text()
    assert "per class min" in log and "[100, 77" not in log          # counts summarised
    capsys.readouterr()
    again = train(load_config(CE, over + ["engine.max_steps=3"]))
    said = capsys.readouterr().out
    assert again["partial"] and "partial run" in said and "this run is complete" not in said
    assert "run.allow_change=[engine.max_steps]" in said
    full = train(load_config(CE, over + ["engine.max_steps=0",
                                         "run.allow_change=[engine.max_steps]"]))
    assert full["partial"] is False and full["epochs"] == 2 and full["global_step"] > 3
    assert "resumed from" in (tmp_path / "smoke" / "run.log").read_text()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, small_test_list):
    from tests.conftest import tiny_overrides
    from ltrainer.trainer.engine import train
    out = tmp_path_factory.mktemp("scale_stage1")
    train(load_config(CE, tiny_overrides(out, small_test_list) + [
        "run.name=stage1", "model.name=mlp", "sched.epochs=1", "data.val_per_class=20"]))
    return str(out / "stage1")


@needs_fmnist
def test_ncm_tau_norm_and_evaluation_per_rank_match_one_process(tiny, tmp_path, stage1,
                                                                monkeypatch):
    """Finding 9: NCM (class sums), tau-norm's choice (per-class hits per tau) and the
    evaluation (sparse confusion counts) reduce per rank instead of gathering the split's
    features on every rank; 2 gloo processes give what 1 process gives."""
    from ltrainer.launchers.train import launch
    from ltrainer.trainer.engine import Trainer
    kept, embed = [], Trainer.embed

    def recording(self, *args, **kw):   # what each split-wide pass leaves in memory
        out = embed(self, *args, **kw)
        kept.append((len(out[0]), out[0][0].numel() if len(out[0]) else 0))
        return out
    monkeypatch.setattr(Trainer, "embed", recording)
    common = [f"model.init={stage1}", "model.name=mlp", "data.val_per_class=20", "sched.epochs=0",
              "sched.warmup_epochs=0"]

    def plan(tag):
        out = []
        for name, extra in (("ncm", ["method.name=ncm"]),
                            ("tau", ["method.name=tau_norm", "model.init_head=true",
                                     "tau_norm.grid=[0.0, 0.5, 1.0, 2.0]"])):
            cfg = load_config(CE, tiny + common + extra + [f"run.name={tag}_{name}"])
            out.append(Stage(name, cfg, str(tmp_path / tag / name)))
        return out
    one = launch(plan("one"), nproc=1)               # in this process: embed is recorded
    width = 64                                        # the MLP backbone's feature size
    assert kept and all(rows == 0 or cols < width for rows, cols in kept), kept
    two = launch(plan("two"), nproc=2)
    assert two["ncm"]["world_size"] == 2
    assert one["tau"]["tau_search"] == two["tau"]["tau_search"] and one["tau"]["tau"] == two["tau"]["tau"]
    for name in ("ncm", "tau"):
        for key in ("top1", "balanced_error", "num_samples", "most_confused"):
            assert one[name][key] == two[name][key], (name, key)
        a, b = (load_per_class(str(tmp_path / t / name)) for t in ("one", "two"))
        assert np.array_equal(confusion_matrix(a), confusion_matrix(b))
    wa, wb = (torch.load(tmp_path / t / "ncm" / "model_final.pt", weights_only=True)
              for t in ("one", "two"))
    torch.testing.assert_close(wa["head.fc.weight"], wb["head.fc.weight"], rtol=1e-6, atol=1e-7)


@needs_fmnist
def test_pipeline_shows_stage_position_eta_and_where_results_are(tiny, tmp_path, capsys):
    over = tiny + ["model.name=mlp", "sched.epochs=1", "engine.max_steps=6",
                   "engine.log_every=2"]
    plan = [Stage(n, load_config(CE, over + [f"run.name=p/{n}"]), str(tmp_path / "p" / n))
            for n in ("first", "second")]
    run_plan(plan)
    out = capsys.readouterr().out
    assert re.search(r"stage 1/2 \(first\): epoch 1/1 step \d+/\d+ .*pipeline ETA \d+s", out)
    assert re.search(r"stage 2/2 \(second\): .*pipeline ETA \d+s", out)
    assert "pipeline done (2 stages)" in out and str(tmp_path / "p" / "second") in out
    assert "stage 2/2 (second)" in (tmp_path / "p" / "second" / "run.log").read_text()


def test_pseudo_labels_place_rows_by_dataset_index_when_images_were_skipped(tmp_path):
    """With data.on_bad_image: skip the pool pass returns only the images read, with their
    dataset indices: row i must still label pool image i, and an unread image is never
    selected (it used to shift every later label by one row)."""
    from ltrainer.trainer.methods.pseudo_label import POOL_SPLIT, PseudoLabel
    n, c, skipped = 8, 3, [2, 5]
    logits = torch.nn.functional.one_hot(torch.arange(n) % c, c).float() * 5
    kept = torch.tensor([i for i in range(n) if i not in skipped])

    def embed(split, fn, gather=True, indices=False, on_batch=None):
        assert split == POOL_SPLIT and indices and not gather
        on_batch(fn(kept), kept % c, kept)     # this rank's rows go to the extraction service
        return fn(kept[:0]), kept[:0], kept[:0]
    lines = []
    me = SimpleNamespace(
        report=None, model=lambda idx: logits[idx], data=SimpleNamespace(num_classes=c),
        cfg=SimpleNamespace(semi=SimpleNamespace(threshold=0.0, top_k=0, save_probs=True),
                            model=SimpleNamespace(init="stage1")),
        pool=SimpleNamespace(hidden=np.arange(n) % c, fingerprint="fp", summary=lambda: {}))
    trainer = SimpleNamespace(embed=embed, info=SimpleNamespace(is_main=True, rank=0),
                              log=SimpleNamespace(info=lines.append), run_dir=str(tmp_path))
    PseudoLabel.prepare_eval(me, trainer)
    rep = me.report
    assert rep["count"] == n and rep["selected"] == n - len(skipped)
    assert rep["accuracy"] == 100.0                 # every read image got its own label
    assert [p["selected"] for p in rep["per_class"]] == [3, 3, 0]   # 2 and 5 are class 2


@needs_fmnist
def test_smoke_pipeline_continues_to_the_full_budget(tiny, tmp_path):
    """Finding 8 in a pipeline: after a max_steps smoke run of every stage, the full run
    continues the first stage and starts the second over from the first's new weights (its
    start weights changed), instead of refusing it for its upstream's fingerprint."""
    from ltrainer.trainer.pipeline import load_plan
    cfg = tmp_path / "two.yaml"
    cfg.write_text(f"_base_: {CE}\nstages:\n  - name: a\n  - name: b\n"
                   f"    model: {{init: '@a'}}\n")
    over = tiny + ["model.name=mlp", "sched.epochs=1", "run.name=two"]
    smoke = run_plan(load_plan(str(cfg), over + ["engine.max_steps=2"]))
    assert smoke["a"]["partial"] and smoke["b"]["partial"]
    full = run_plan(load_plan(str(cfg), over + ["engine.max_steps=0",
                                                "run.allow_change=[engine.max_steps]"]))
    assert not full["a"]["partial"] and not full["b"]["partial"]
    assert full["a"]["global_step"] == full["b"]["global_step"] > 2
    assert "starting over from its new weights" in (tmp_path / "two" / "b" / "run.log").read_text()
