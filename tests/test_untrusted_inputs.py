"""Files a user hands us (issue 11, finding 5 and 6): pseudo-label files, feature banks, weight
imports through model.init, unlabeled-pool summaries. Each bad file is refused before anything
trains, in one line naming the file, as a user error (exit 2 from the launchers and tools)."""
import json
import os
import re

import numpy as np
import pytest
import torch

from ltrainer.data_pipelines.sources import DataError
from tests.conftest import ROOT, needs_fmnist, run_cli
from ltrainer.trainer.banks import files as bank_files
from ltrainer.trainer.banks import runs as bank_runs
from ltrainer.trainer import pseudo_labels
from ltrainer.trainer.models import create_model
from ltrainer.trainer.transfer import load_pretrained

CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")


def one_line(exc_info, *names) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg
    return msg


# ------------------------------------------------------------------------ pseudo-label files

def write_pl(path, n=40, c=10, **change):
    """A valid pseudo-label file of n rows and c classes, with arrays or meta keys replaced
    (meta=None drops a meta key; meta_raw replaces the meta array itself)."""
    rng = np.random.RandomState(0)
    probs = rng.dirichlet(np.ones(c), n).astype(np.float32)
    pl = pseudo_labels.from_probs(probs, rng.randint(-1, c, n), pool_fingerprint="f" * 64)
    arrays = {"labels": pl.labels, "confidence": pl.confidence, "selected": pl.selected,
              "hidden_labels": pl.hidden}
    meta = dict(pl.meta)
    for k, v in change.pop("meta", {}).items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    arrays["meta"] = change.pop("meta_raw", np.asarray(json.dumps(meta)))
    arrays.update(change)
    np.savez(path, **arrays)
    return str(path)


def test_valid_pseudo_label_file_loads(tmp_path):
    pl = pseudo_labels.load(write_pl(tmp_path / "ok.npz"))
    assert len(pl) == 40 and pl.labels.dtype == np.int64


BAD_PSEUDO_LABELS = {   # case: (what the file holds instead, what the error says)
    # labels
    "label-99-of-10": ({"labels": np.r_[np.zeros(39, np.int64), 99]},
                       r"labels must lie in \[0, 10\).*row 39 holds 99"),
    "negative-label": ({"labels": np.r_[np.zeros(39, np.int64), -1]},
                       r"labels must lie in \[0, 10\).*row 39 holds -1"),
    "float-labels": ({"labels": np.linspace(0, 9, 40)},
                     "expected integer class labels, got dtype float64"),
    "nan-labels": ({"labels": np.r_[np.zeros(39), np.nan]},
                   "expected integer class labels, got dtype float64"),
    "2-d-labels": ({"labels": np.zeros((40, 2), np.int64)},
                   r"expected a 1-D array of class labels, got shape \(40, 2\)"),
    # meta
    "meta-missing-num_classes": ({"meta": {"num_classes": None}},
                                 r"meta lacks or mistypes num_classes \(int\)"),
    "meta-missing-fingerprint": ({"meta": {"pool_fingerprint": None}},
                                 "meta lacks or mistypes pool_fingerprint"),
    "meta-count-str": ({"meta": {"count": "40"}}, r"meta lacks or mistypes count \(int\)"),
    "meta-classes-float": ({"meta": {"num_classes": 10.0}}, "meta lacks or mistypes num_classes"),
    "meta-not-json": ({"meta_raw": np.asarray("{not json")}, "meta is not valid JSON"),
    "meta-json-list": ({"meta_raw": np.asarray("[1, 2]")},
                       "meta must be a JSON object, got a list"),
    "meta-numeric": ({"meta_raw": np.arange(3)}, "meta is not valid JSON"),
    # confidences, probabilities, selection
    "nan-confidence": ({"confidence": np.r_[np.full(39, 0.5, np.float32), np.nan]},
                       r"confidence: expected finite values in \[0.0, 1.0\], but row 39 holds nan"),
    "confidence-above-1": ({"confidence": np.full(40, 1.5, np.float32)},
                           r"confidence: .* row 0 holds 1.5"),
    "inf-probs": ({"probs": np.full((40, 10), np.inf, np.float32)},
                  r"probs: .* row 0, column 0 holds inf"),
    "float-selection": ({"selected": np.ones(40)}, "selected must be a boolean array"),
    # row counts
    "short-confidence": ({"confidence": np.full(30, 0.5, np.float32)},
                         r"confidence has shape \(30,\), expected \(40,\)"),
    "meta-count-not-rows": ({"meta": {"count": 50}}, r"labels has shape \(40,\), expected \(50,\)"),
    "probs-of-3-classes": ({"probs": np.full((40, 3), 0.1, np.float32)},
                           r"probs has shape \(40, 3\), expected \(40, 10\)"),
}


@pytest.mark.parametrize("case", list(BAD_PSEUDO_LABELS))
def test_bad_pseudo_label_file_is_refused_naming_the_file(tmp_path, case):
    change, expected = BAD_PSEUDO_LABELS[case]
    path = write_pl(tmp_path / "pl.npz", **change)
    with pytest.raises(DataError, match=expected) as e:
        pseudo_labels.load(path)
    one_line(e, path)


def test_pseudo_labels_of_another_pool_size_are_a_user_error(tmp_path):
    path = write_pl(tmp_path / "pl.npz")
    pl = pseudo_labels.load(path)
    with pytest.raises(DataError, match=r"labels another unlabeled pool \(40 images") as e:
        pseudo_labels.check_pool(pl, path, "f" * 64, 41, 10)
    one_line(e, path)


@needs_fmnist
def test_label_99_stops_self_training_at_construction(tiny, tmp_path):
    """The file an earlier pipeline stage wrote is read when the method is built, before the
    first step (not as an IndexError a few steps in)."""
    from ltrainer.data_pipelines.build import build_data
    from ltrainer.data_pipelines.unlabeled_pool import build_pool
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.serving import build_method

    path = str(tmp_path / "pl.npz")
    cfg = load_config(CE, tiny + ["model.name=mlp", "semi.size=1", "semi.unlabeled_ratio=0.5",
                                  "method.name=self_training", f"semi.pseudo_labels={path}"])
    pool = build_pool(cfg.data, cfg.semi)
    probs = np.random.RandomState(0).dirichlet(np.ones(10), len(pool))
    pl = pseudo_labels.from_probs(probs, pool.hidden, pool_fingerprint=pool.fingerprint)
    pl.labels[-1] = 99
    pseudo_labels.save(path, pl)
    with pytest.raises(DataError, match=rf"row {len(pool) - 1} holds 99") as e:
        build_method(cfg, build_data(cfg.data, eval_splits=()), torch.device("cpu"))
    one_line(e, path)


@needs_fmnist
def test_dry_run_refuses_a_bad_pseudo_label_file(tmp_path, capsys):
    from ltrainer.launchers.train import main

    path = write_pl(tmp_path / "pl.npz", labels=np.full(40, 99))
    assert main([CE, "method.name=self_training", f"semi.pseudo_labels={path}",
                 f"run.out_dir={tmp_path}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and path in err and "row 0 holds 99" in err, err


# ------------------------------------------------------------------------------ feature banks

def bank(path, n=60, d=8, classes=5, dtype=np.float32):
    rng = np.random.default_rng(0)
    return bank_files.write_bank(str(path), rng.standard_normal((n, d)).astype(dtype),
                         rng.integers(0, classes, n), num_classes=classes)


def test_bank_with_nan_features_exits_2_through_the_cli(tmp_path):
    path = bank(tmp_path / "b")
    feats = np.load(os.path.join(path, "features.npy"))
    feats[17, 3] = np.nan
    np.save(os.path.join(path, "features.npy"), feats)
    proc = run_cli("tools/feature_bank.py", "knn", "--query", path, "--ref", path, "--k", "3",
                   check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and os.path.join(path, "features.npy") in err, err
    assert "row 17, column 3 holds nan" in err and "top-1" not in proc.stdout


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_finite_check_reads_a_memory_mapped_bank_in_blocks(tmp_path, monkeypatch, dtype, bad):
    """A bank is checked a block of rows at a time (here 4 rows of 8), never read whole: the
    error names the block in which the bad row was found."""
    from ltrainer.trainer import validation

    path = bank(tmp_path / "b", n=60, dtype=dtype)
    feats = np.load(os.path.join(path, "features.npy"))
    feats[57, 0] = bad
    np.save(os.path.join(path, "features.npy"), feats)
    monkeypatch.setattr(validation, "CHUNK_BYTES", 4 * 8 * np.dtype(dtype).itemsize)
    with pytest.raises(bank_files.BankError, match=rf"row 57, column 0 holds {bad} \(1 bad values in "
                                           r"rows 56..59\)"):
        bank_files.load_bank(path, mmap=True)


def test_bank_with_float_labels_is_refused(tmp_path):
    path = bank(tmp_path / "b")
    np.save(os.path.join(path, "labels.npy"), np.linspace(0, 4, 60))
    with pytest.raises(bank_files.BankError, match="expected integer class labels, got dtype float64") as e:
        bank_files.load_bank(path)
    one_line(e, os.path.join(path, "labels.npy"))


def test_bank_header_with_wrong_types_is_refused(tmp_path):
    path = bank(tmp_path / "b")
    hpath = os.path.join(path, bank_files.HEADER)
    header = json.load(open(hpath))
    json.dump({**header, "num_classes": "5"}, open(hpath, "w"))
    with pytest.raises(bank_files.BankError, match="num_classes = '5'") as e:
        bank_files.load_bank(path)
    one_line(e, hpath)


# ------------------------------------------------------------------------------ weight imports

def resnet8_state():
    torch.manual_seed(0)
    return create_model("resnet8", 10).state_dict()


def test_nan_checkpoint_is_refused_naming_the_file_and_key(tmp_path):
    state = resnet8_state()
    key = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[key] = torch.full_like(state[key], float("nan"))
    path = str(tmp_path / "nan.pt")
    torch.save(state, path)
    with pytest.raises(DataError, match=rf"tensor '{key}' holds NaN or inf") as e:
        load_pretrained(create_model("resnet8", 10), path)
    one_line(e, path)
    with pytest.raises(DataError, match=rf"tensor '{key}'"):   # tools read weights the same way
        bank_runs.load_model_state(path)


@needs_fmnist
def test_dry_run_refuses_a_nan_model_init(tmp_path, capsys):
    from ltrainer.launchers.train import main

    state = resnet8_state()
    state["backbone.conv1.weight"][0, 0, 0, 0] = float("inf")
    path = str(tmp_path / "inf.pt")
    torch.save(state, path)
    assert main([CE, f"model.init={path}", f"run.out_dir={tmp_path}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and path in err and "backbone.conv1.weight" in err, err


def unfinished_run(run_dir):
    """A run folder stopped mid-way: a training checkpoint, no model_final.pt."""
    os.makedirs(run_dir)
    state = resnet8_state()
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1},
               os.path.join(run_dir, "checkpoint_last.pt"))
    return str(run_dir), state


def test_unfinished_run_folder_is_refused_unless_its_checkpoint_is_named(tmp_path):
    run_dir, state = unfinished_run(tmp_path / "run")
    last = os.path.join(run_dir, "checkpoint_last.pt")
    with pytest.raises(DataError) as e:
        load_pretrained(create_model("resnet8", 10), run_dir)
    assert one_line(e) == (f"{run_dir} has no model_final.pt (the run did not finish); to start "
                           f"from its last checkpoint pass model.init={last}")
    model = create_model("resnet8", 10)
    assert "initialized the backbone from" in load_pretrained(model, last)
    assert all(torch.equal(v, state[f"backbone.{k}"])
               for k, v in model.backbone.state_dict().items())
    with pytest.raises(DataError, match=re.escape(f"pass --checkpoint={last}")):  # tools alike
        bank_runs.default_checkpoint(run_dir)


@needs_fmnist
def test_dry_run_refuses_an_unfinished_model_init_and_accepts_its_checkpoint(tmp_path, capsys):
    from ltrainer.launchers.train import main

    run_dir, _ = unfinished_run(tmp_path / "run")
    common = [CE, f"run.out_dir={tmp_path}", "--dry-run"]
    assert main(common + [f"model.init={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no model_final.pt (the run did not finish)" in err, err
    assert main(common + [f"model.init={os.path.join(run_dir, 'checkpoint_last.pt')}"]) == 0
    assert main(common + [f"model.init={tmp_path / 'nothing'}"]) == 2
    assert "no such file or run folder" in capsys.readouterr().err


@pytest.mark.parametrize("write, expected", [
    (lambda p: torch.save(torch.zeros(3, 4), p), r"found a Tensor of shape \(3, 4\)"),
    (lambda p: torch.save([1, 2, 3], p), "found a list of 3 items"),
    (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), "found a dict with keys epoch, lr"),
    (lambda p: open(p, "w").write('{"balanced_error": 30.0}'), "cannot be read as a PyTorch "
                                                               "weights file"),
    (lambda p: open(p, "w").close(), "cannot be read as a PyTorch weights file"),
], ids=["tensor", "list", "dict-of-numbers", "renamed-results-json", "empty"])
def test_a_file_that_is_not_weights_is_refused_in_one_line(tmp_path, write, expected):
    path = str(tmp_path / "model_final.pt")
    write(path)
    with pytest.raises(DataError, match=expected) as e:
        load_pretrained(create_model("resnet8", 10), path)
    one_line(e, path)


# ------------------------------------------------------------------------------ pool files

@needs_fmnist
def test_malformed_pool_summary_is_refused_naming_the_file(tmp_path):
    from ltrainer.data_pipelines.unlabeled_pool import read_pool
    from ltrainer.trainer.config import load_config

    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"format": "ltt-unlabeled-pool", "labeled": {"classes": None},
                                "request": {}, "parts": [{"name": "relevant", "root": None}]}))
    with pytest.raises(DataError, match=r"malformed pool summary.*parts\[0\]\.file") as e:
        read_pool(str(path), load_config(CE).data)
    one_line(e, path)
