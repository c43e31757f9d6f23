"""Feature banks: extraction equals a forward pass, killed extractions resume to the same bank,
kNN equals a numpy brute force, leakage on data with known answers, clear format errors."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from tests.conftest import KILL_PLUGINS, ROOT, needs_fmnist, tiny_overrides
from ltrainer.trainer.banks import analysis as bank_analysis
from ltrainer.trainer.banks import extract as bank_extract
from ltrainer.trainer.banks import files as bank_files
from ltrainer.trainer.banks import runs as bank_runs
from ltrainer.trainer.banks import search as bank_search

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss not installed: pip install faiss-cpu")
CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")


def make_run(run_dir, test_list, seed=0, model="resnet8"):
    """A finished run folder (config.yaml, model_final.pt, results.json) of a randomly
    initialised model; a ResNet's BatchNorm statistics are not the defaults, so features are
    only right if extraction runs the model in eval mode."""
    from ltrainer.data_pipelines.build import build_data
    from ltrainer.trainer.config import load_config, save_config
    from ltrainer.trainer.methods import create_method

    os.makedirs(run_dir, exist_ok=True)
    cfg = load_config(CE, ["data.n_max=100", "data.rho=10", f"model.name={model}",
                           f"data.test_list={test_list}", "data.eval_batch_size=128"])
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    data = build_data(cfg.data, eval_splits=())
    torch.manual_seed(seed)
    model = create_method(cfg, data, torch.device("cpu")).model
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), os.path.join(run_dir, "model_final.pt"))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"class_counts": data.class_counts}, f)
    return str(run_dir)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_test_list):
    if not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"):
        pytest.skip("apt-get install dataset-fashion-mnist")
    return make_run(tmp_path_factory.mktemp("runs") / "ce", small_test_list)


def default_bank(run):
    """Where `--run` commands look for the test bank: tests that extract it there spare the
    later ones an extraction."""
    return bank_extract.run_bank_path(run, "test", "features", os.path.join(run, "model_final.pt"))


def direct_forward(run_dir, split="test"):
    """Features and logits of the whole split in one batch; also checks that a hooked
    module ("backbone") gives the same features as .features()."""
    run = bank_runs.load_run_model(run_dir)
    ds, _ = bank_runs.open_split(run.cfg.data, split)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        feats, logits = run.model.features(images).numpy(), run.model(images).numpy()
    np.testing.assert_allclose(bank_runs.feature_fn(run, "backbone")(images[:20]).numpy(), feats[:20],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(bank_files.BankError, match="not in the model"):
        bank_runs.feature_fn(run, "no.such.layer")
    return feats, logits, ds.labels


# ============================================================================ extraction

@needs_fmnist
def test_extraction_equals_direct_forward(tiny_run, tmp_path):
    out = bank_extract.extract_run(tiny_run, default_bank(tiny_run), split="test", chunk_size=64,
                         batch_size=50, progress=False)
    bank = bank_files.load_bank(out)
    feats, logits, labels = direct_forward(tiny_run)
    np.testing.assert_allclose(bank.features, feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(bank.labels, labels)
    np.testing.assert_array_equal(bank.indices, np.arange(300))
    assert bank.paths[0].startswith("fashion_mnist[") and len(set(bank.paths)) == 300
    h = bank.header
    assert h["checkpoint"] == os.path.join(tiny_run, "model_final.pt")
    assert h["layer"] == "features" and h["count"] == 300 and h["dim"] == feats.shape[1]
    assert h["dataset"]["split"] == "test" and h["dataset"]["list"].endswith("test300.txt")
    assert h["label_counts"] == [30] * 10
    assert h["train_class_counts"] == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert not os.path.exists(os.path.join(out, bank_files.PARTIAL))

    half = bank_files.load_bank(bank_extract.extract_run(tiny_run, str(tmp_path / "l"), layer="logits",
                                       dtype="float16", progress=False))
    assert half.features.dtype == np.float16
    np.testing.assert_allclose(half.features.astype(np.float32), logits, rtol=1e-2, atol=1e-2)


@needs_fmnist
def test_killed_extraction_resumes_to_same_bank(tiny_run, tmp_path, monkeypatch):
    """Two DDP ranks SIGKILL themselves after 2 chunks each (rank 0 owns chunks 0, 2, 4);
    a run with another layer is refused; one process then finishes the bank, equal to an
    uninterrupted extraction."""
    from torch.multiprocessing import ProcessExitedException

    ref = bank_files.load_bank(bank_extract.extract_run(tiny_run, default_bank(tiny_run), progress=False))
    out = str(tmp_path / "killed")
    monkeypatch.setenv("LTT_TEST_KILL", "kill:chunk:2")            # tests/kill_points.py
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([KILL_PLUGINS, ROOT]))
    with pytest.raises(ProcessExitedException, match="signal SIGKILL"):
        bank_extract.extract_run_ddp(2, run_dir=tiny_run, out=out, chunk_size=64, progress=False)
    monkeypatch.delenv("LTT_TEST_KILL")
    files = set(os.listdir(os.path.join(out, bank_files.PARTIAL)))
    # The rank that killed itself first wrote its two chunks; the spawner then stops the other
    # one wherever it was (under load, before its first chunk), so only that rank's pair is
    # certain. Neither rank can get past its second chunk.
    assert bank_extract.MANIFEST in files and len(files) <= 5
    assert {"chunk_000000.npz", "chunk_000002.npz"} <= files or \
        {"chunk_000001.npz", "chunk_000003.npz"} <= files, files
    assert not {"chunk_000004.npz", "chunk_000005.npz"} & files, files
    with pytest.raises(bank_files.BankError, match="missing header.*unfinished extraction"):
        bank_files.load_bank(out)
    with pytest.raises(bank_files.BankError, match="partial bank of another extraction.*layer"):
        bank_extract.extract_run(tiny_run, out, layer="logits", chunk_size=64, progress=False)

    bank_extract.extract_run(tiny_run, out, chunk_size=64, progress=False)
    bank = bank_files.load_bank(out)
    np.testing.assert_allclose(bank.features, ref.features, rtol=1e-5, atol=1e-6)
    for name in ("labels", "indices", "paths"):
        np.testing.assert_array_equal(getattr(bank, name), getattr(ref, name))
    assert not os.path.exists(os.path.join(out, bank_files.PARTIAL))
    with pytest.raises(bank_files.BankError, match="already holds a complete bank that differs"):
        bank_extract.extract_run(tiny_run, out, chunk_size=64, dtype="float16", progress=False)
    assert bank_extract.extract_run(tiny_run, out, chunk_size=32, progress=False) == out  # no-op


@needs_fmnist
@pytest.mark.parametrize("name", ["mean_teacher", "self_training"])
def test_a_semi_supervised_run_is_rebuilt_with_its_pool(name, tmp_path, small_test_list):
    """A method that reads the unlabeled pool (needs().pool) gets it when the bank tools rebuild
    its run, so they work on semi-supervised run folders (self-training: with its
    pseudo-labels): the bank equals a forward pass, and the pool labels itself (label_run)."""
    from ltrainer.data_pipelines.unlabeled_pool import build_pool
    from ltrainer.trainer import pseudo_labels
    from ltrainer.trainer.banks.label_pool import label_run
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.engine import train
    over = tiny_overrides(tmp_path, small_test_list) + [
        "model.name=mlp", "semi.size=1", "semi.rho_u=10", "semi.unlabeled_ratio=0.5",
        f"method.name={name}", "engine.max_steps=2", "eval.every_epochs=0", "run.name=semi"]
    if name == "self_training":
        over.append(f"semi.pseudo_labels={tmp_path / 'pl.npz'}")
        pool = build_pool(*(lambda c: (c.data, c.semi))(load_config(CE, over)))
        probs = np.random.RandomState(0).dirichlet(np.ones(pool.num_classes), len(pool))
        pseudo_labels.save(str(tmp_path / "pl.npz"), pseudo_labels.from_probs(
            probs, pool.hidden, pool_fingerprint=pool.fingerprint))
    train(load_config(CE, over))
    run_dir = str(tmp_path / "semi")
    run = bank_runs.load_run_model(run_dir)
    assert run.method.pool is not None and len(run.method.pool) > 0
    bank = bank_files.load_bank(bank_extract.extract_run(run_dir, str(tmp_path / "bank"),
                                                         progress=False))
    feats, _, labels = direct_forward(run_dir)
    np.testing.assert_allclose(bank.features, feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(bank.labels, labels)
    report = label_run(run_dir, str(tmp_path / "again.npz"), progress=False)
    assert report == pseudo_labels.accuracy_report(pseudo_labels.load(str(tmp_path / "again.npz")))


# ============================================================================ bank format

def synthetic(path, n=200, d=16, classes=5, seed=0, counts=None, dtype=np.float32, spread=0.8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    labels = rng.integers(0, classes, n)
    feats = (centres[labels] + spread * rng.standard_normal((n, d))).astype(dtype)
    header = {"train_class_counts": counts} if counts else {}
    return bank_files.write_bank(str(path), feats, labels, header, num_classes=classes)


def test_bad_banks_fail_clearly(tmp_path):
    path = synthetic(tmp_path / "b")
    assert len(bank_files.load_bank(path)) == 200
    np.save(os.path.join(path, "labels.npy"), np.zeros(150, dtype=np.int64))
    with pytest.raises(bank_files.BankError, match=r"labels.npy: shape \(150,\) does not match the "
                                           r"header \(count=200"):
        bank_files.load_bank(path)
    path = synthetic(tmp_path / "c")
    np.save(os.path.join(path, "features.npy"), np.zeros((200, 8), dtype=np.float32))
    with pytest.raises(bank_files.BankError, match=r"features.npy: shape \(200, 8\)"):
        bank_files.load_bank(path)
    path = synthetic(tmp_path / "d")
    np.save(os.path.join(path, "paths.npy"), np.array([{"a": 1}] * 200), allow_pickle=True)
    with pytest.raises(bank_files.BankError, match="cannot be read as a plain .npy"):
        bank_files.load_bank(path)
    os.remove(os.path.join(path, bank_files.HEADER))
    with pytest.raises(bank_files.BankError, match="missing header header.json"):
        bank_files.load_bank(path)
    path = synthetic(tmp_path / "e")
    header = json.load(open(os.path.join(path, bank_files.HEADER)))
    del header["dim"]
    json.dump(header, open(os.path.join(path, bank_files.HEADER), "w"))
    with pytest.raises(bank_files.BankError, match="header lacks dim"):
        bank_files.load_bank(path)
    a, b = bank_files.load_bank(synthetic(tmp_path / "f")), bank_files.load_bank(synthetic(tmp_path / "g", d=8))
    with pytest.raises(bank_files.BankError, match="different models or layers"):
        bank_files.check_compatible(a, b)
    with pytest.raises(ImportError, match="pip install not-a-package"):
        bank_search.require("not_a_module_xyz", "not-a-package")


# ============================================================================ kNN

def numpy_knn(q, r, r_labels, k, t, classes, loo=False):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    s = q.astype(np.float64) @ r.T.astype(np.float64)
    if loo:
        np.fill_diagonal(s, -np.inf)
    top = np.argsort(-s, axis=1)[:, :k]
    scores = np.zeros((len(q), classes))
    for i in range(len(q)):
        for j in top[i]:
            scores[i, r_labels[j]] += np.exp(s[i, j] / t)
    return scores.argmax(1)


def accuracies(pred, y, classes, groups):
    per = [100 * np.mean(pred[y == c] == c) for c in range(classes)]
    return {"top1": 100 * np.mean(pred == y), "balanced_top1": np.mean(per),
            **{g: np.mean([per[c] for c in ids]) for g, ids in groups.items()}}


@needs_faiss
def test_knn_equals_numpy_brute_force(tmp_path):
    counts = [500, 150, 60, 30, 10]  # many {0, 1}, medium {2, 3}, few {4}
    groups = {"many": [0, 1], "medium": [2, 3], "few": [4]}
    ref = bank_files.load_bank(synthetic(tmp_path / "r", n=400, counts=counts))
    query = bank_files.load_bank(synthetic(tmp_path / "q", n=150, seed=1, dtype=np.float16,
                                   counts=counts))
    for k, t in ((1, 0.07), (7, 0.1), (25, 1.0)):
        got = bank_search.knn_evaluate(query, ref, k=k, temperature=t)
        pred = numpy_knn(np.asarray(query.features, np.float32), ref.features, ref.labels, k,
                         t, 5)
        want = accuracies(pred, query.labels, 5, groups)
        for key, v in want.items():
            assert got[key] == pytest.approx(v), (k, key)
    loo = bank_search.knn_evaluate(ref, ref, k=5, temperature=0.1)
    pred = numpy_knn(ref.features, ref.features, ref.labels, 5, 0.1, 5, loo=True)
    assert loo["leave_one_out"] and loo["top1"] == pytest.approx(100 * np.mean(pred == ref.labels))

    exact = bank_search.knn_evaluate(query, ref, k=7, temperature=0.1)
    ivf_all = bank_search.knn_evaluate(query, ref, k=7, temperature=0.1, index="ivf", nlist=4, nprobe=4)
    assert ivf_all["recall"] == 1.0 and ivf_all["top1"] == exact["top1"]
    ivf_one = bank_search.knn_evaluate(query, ref, k=7, temperature=0.1, index="ivf", nlist=8, nprobe=1)
    assert 0.0 < ivf_one["recall"] <= 1.0 and ivf_one["nprobe"] == 1


def test_knn_vote_weights_by_temperature():
    sims = np.array([[0.9, 0.5, 0.5]])
    ids = np.array([[0, 1, 2]])
    labels = np.array([0, 1, 1])
    assert bank_search.knn_vote(sims, ids, labels, 2, temperature=0.05)[0] == 0  # one close neighbour
    assert bank_search.knn_vote(sims, ids, labels, 2, temperature=10.0)[0] == 1  # two far ones
    assert bank_search.knn_vote(sims, np.array([[-1, 1, 2]]), labels, 2, 0.05)[0] == 1  # -1: no vote


# ============================================================================ leakage

@needs_faiss
def test_leakage_report_on_constructed_data(tmp_path):
    """Class c sits at e_c (class 2 leans towards class 1). Test samples of tail class 2 are
    3 of 10 at the head class 0: leaked share 0.3; tail class 3 never leaks."""
    rng = np.random.default_rng(0)
    e = np.eye(8)
    centre = {0: e[0], 1: e[1], 2: (e[2] + 0.5 * e[1]) / np.sqrt(1.25), 3: e[3]}
    noisy = lambda v, n: v + 1e-3 * rng.standard_normal((n, 8))  # noqa: E731
    ref_labels = [0] * 60 + [1] * 60 + [2] * 6 + [3] * 6
    ref = np.concatenate([noisy(centre[c], 1) for c in ref_labels])
    q_labels = [2] * 10 + [3] * 10
    q = np.concatenate([noisy(centre[0], 3), noisy(centre[2], 7), noisy(centre[3], 10)])
    counts = {"train_class_counts": [200, 150, 10, 5]}  # many {0, 1}, few {2, 3}
    r_bank = bank_files.load_bank(bank_files.write_bank(str(tmp_path / "r"), ref.astype(np.float32),
                                        ref_labels, counts))
    q_bank = bank_files.load_bank(bank_files.write_bank(str(tmp_path / "q"), q.astype(np.float32), q_labels,
                                        counts, num_classes=4))
    rep = bank_analysis.leakage_report(q_bank, r_bank, k=5)
    assert rep["head"] == [0, 1] and rep["tail"] == [2, 3] and "many-shot" in rep["rule"]
    c2, c3 = rep["per_class"][2], rep["per_class"][3]
    assert c2["samples"] == 10 and c2["leaked_share"] == pytest.approx(0.3)
    assert c2["head_neighbor_share"] == pytest.approx(0.3)
    assert c2["own_class_neighbor_share"] == pytest.approx(0.7) and c2["top_head_class"] == 0
    assert c3["leaked_share"] == 0.0 and c3["own_class_neighbor_share"] == 1.0
    assert c3["top_head_class"] is None
    dist = np.array(rep["centroid_distances"])
    assert np.allclose(np.diag(dist), 0, atol=1e-5)
    assert dist[2, 1] == pytest.approx(1 - 0.5 / np.sqrt(1.25), abs=1e-3)
    assert dist[2, 0] == pytest.approx(1.0, abs=1e-3) and dist[0, 1] == pytest.approx(1, abs=1e-3)
    assert c2["nearest_head_class"] == 1
    assert c3["query_to_own_centroid"] == pytest.approx(0, abs=1e-4)
    assert bank_analysis.head_tail_classes([50, 40, 30, 25, 21, 20])[2] == "most / least frequent third"
    assert bank_analysis.head_tail_classes([50, 40, 30, 25, 21, 20])[:2] == ([0, 1], [4, 5])


# ============================================================================ inspect, CLI

@needs_faiss
@needs_fmnist
def test_cli_on_a_run_folder(tiny_run, tmp_path, capsys):
    from ltrainer.tools import feature_bank as tool

    assert tool.main(["knn", "--run", tiny_run, "--k", "5"]) == 0
    assert "balanced %" in capsys.readouterr().out
    grid = str(tmp_path / "grid.png")
    assert tool.main(["inspect", "neighbors", "--run", tiny_run, "--class", "9", "--n", "2",
                      "--k", "3", "--grid", grid]) == 0
    out = capsys.readouterr().out
    assert out.count("query row") == 2 and "fashion_mnist[" in out
    assert open(grid, "rb").read(4) == b"\x89PNG"
    js = str(tmp_path / "leak.json")
    assert tool.main(["inspect", "leakage", "--run", tiny_run, "--json", js]) == 0
    rep = json.load(open(js))
    assert rep["head"] == [0, 1, 2] and rep["tail"] == [7, 8, 9]  # no many-shot class here
    png = str(tmp_path / "w.png")
    assert tool.main(["inspect", "weights", "--run", tiny_run, "--out", png]) == 0
    state = torch.load(os.path.join(tiny_run, "model_final.pt"), weights_only=True)
    norms, key = bank_analysis.classifier_weight_norms(state)
    assert key == "head.fc.weight"
    np.testing.assert_allclose(norms, state[key].norm(dim=1).numpy(), rtol=1e-6)
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert tool.main(["knn", "--query", str(tmp_path / "none"), "--ref", str(tmp_path)]) == 2
    assert "missing header" in capsys.readouterr().err
