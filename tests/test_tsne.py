"""t-SNE tool: sub-sampling, faiss neighbours for openTSNE, PNGs from banks and run folders."""
import importlib.util

import numpy as np
import pytest

from tests.conftest import needs_fmnist
from ltrainer.trainer.banks import analysis as bank_analysis
from ltrainer.trainer.banks import extract as bank_extract
from ltrainer.trainer.banks import files as bank_files
from ltrainer.trainer.banks import search as bank_search

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None or importlib.util.find_spec("openTSNE") is None,
    reason="needs faiss and openTSNE: pip install faiss-cpu opentsne")
FAST = ["--iters", "60", "--perplexity", "10", "--jobs", "1"]


def test_subsample_keeps_every_class_and_is_deterministic():
    from ltrainer.tools.tsne import subsample

    labels = np.array([0] * 5000 + [1] * 300 + [2] * 7)
    rows = subsample(labels, 500, seed=3, min_per_class=50)
    assert len(rows) == 500 and np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows]).tolist()[2] == 7 and np.bincount(labels[rows])[1] >= 50
    np.testing.assert_array_equal(rows, subsample(labels, 500, seed=3, min_per_class=50))
    assert len(subsample(labels, 0)) == len(labels) == len(subsample(labels, 10**6))


def test_faiss_neighbors_match_brute_force():
    from ltrainer.tools.tsne import faiss_neighbors

    x = np.random.default_rng(0).standard_normal((120, 6)).astype(np.float32)
    ids, dist = faiss_neighbors(x, 5)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(ids, np.argsort(d, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :5], rtol=1e-4)


def bank(path, n, seed, counts):
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(counts), n, p=np.array(counts) / sum(counts))
    centres = np.random.default_rng(0).standard_normal((len(counts), 32)) * 3
    feats = (centres[labels] + rng.standard_normal((n, 32))).astype(np.float32)
    return bank_files.write_bank(str(path), feats, labels, {"train_class_counts": counts},
                         num_classes=len(counts))


def test_plot_from_banks_states_the_subsample(tmp_path, capsys):
    from ltrainer.tools import tsne

    counts = [400, 200, 100, 50, 19, 10]
    train, test = bank(tmp_path / "tr", 780, 1, counts), bank(tmp_path / "te", 300, 2, counts)
    out = str(tmp_path / "one.png")
    assert tsne.main(["plot", "--train", train, "--test", test, "--out", out,
                      "--max-train", "250", "--min-per-class", "20", *FAST]) == 0
    text = capsys.readouterr().out
    assert "250 of 780 train + 300 test points (random sub-sample" in text
    assert "head [0, 1], tail [4, 5]" in text
    assert open(out, "rb").read(4) == b"\x89PNG"


@needs_fmnist
def test_compare_two_run_folders(tmp_path, small_test_list, capsys):
    from tests.test_feature_bank import make_run
    from ltrainer.tools import tsne

    a = make_run(tmp_path / "ce", small_test_list, seed=0, model="mlp")
    b = make_run(tmp_path / "ssp", small_test_list, seed=1, model="mlp")
    out = str(tmp_path / "cmp.png")
    assert tsne.main(["compare", a, b, "--out", out, "--names", "CE", "CE + SSP",
                      "--max-train", "200", "--max-test", "150", *FAST]) == 0
    text = capsys.readouterr().out
    assert "CE: 200 of 403 train + 150 of 300 test" in text and "CE + SSP: 200 of 403" in text
    assert open(out, "rb").read(4) == b"\x89PNG"
    assert tsne.main(["compare", a, str(tmp_path / "nope"), "--out", out]) == 2


@needs_fmnist
def test_inspect_pair_reports_knn_leakage_and_tsne(tmp_path, small_test_list):
    from tests.test_feature_bank import make_run
    from ltrainer.tools import inspect_pair
    from ltrainer.trainer.banks import analysis as bank_analysis
    from ltrainer.trainer.banks import extract as bank_extract
    from ltrainer.trainer.banks import files as bank_files
    from ltrainer.trainer.banks import search as bank_search

    a = make_run(tmp_path / "ce", small_test_list, seed=0, model="mlp")
    b = make_run(tmp_path / "ssp", small_test_list, seed=1, model="mlp")
    out = str(tmp_path / "report" / "pair")
    assert inspect_pair.main([a, b, "--names", "CE", "CE + SSP", "--out", out,
                              "--max-points", "150", "--tsne", *FAST]) == 0
    text = open(out + ".md").read()
    knn = bank_search.knn_evaluate(bank_extract.run_bank(b, "test"), bank_extract.run_bank(b, "train"), k=20)
    assert f"| CE + SSP | {knn['top1']:.2f} | {knn['balanced_top1']:.2f} |" in text
    leak = bank_analysis.leakage_report(bank_extract.run_bank(a, "test"), bank_extract.run_bank(a, "train"), k=10)
    first_tail = next(iter(leak["per_class"].values()))
    assert f"| CE | {100 * first_tail['leaked_share']:.1f} / " in text
    assert open(out + "_tsne.png", "rb").read(4) == b"\x89PNG"
    assert inspect_pair.main([a, str(tmp_path / "nope"), "--out", out]) == 2
