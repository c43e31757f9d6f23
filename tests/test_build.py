"""data_pipelines.build: what the engine iterates, independent of worker count."""
import pytest
import torch

from ltrainer.data_pipelines.build import build_data
from ltrainer.data_pipelines.sources import DataError
from tests.conftest import needs_fmnist
from ltrainer.trainer.config import ConfigError, load_config

pytestmark = needs_fmnist


def data_cfg(*over):
    return load_config(None, ["data.n_max=60", "data.rho=10", "data.batch_size=16", *over]).data


def epoch_batches(bundle, kind="uniform", epoch=0, start=0, weights=None):
    loader, _ = bundle.train_loader(kind, epoch, start, class_weights=weights)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_worker_processes_do_not_change_batches():
    """Augmentation is seeded per sample, so 0 and 2 workers give the same tensors."""
    a = epoch_batches(build_data(data_cfg("data.workers=0"), seed=5), epoch=1)
    b = epoch_batches(build_data(data_cfg("data.workers=2"), seed=5), epoch=1)
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_epochs_differ_and_resume_skips_exactly():
    bundle = build_data(data_cfg(), seed=0)
    e0, e1 = epoch_batches(bundle, epoch=0), epoch_batches(bundle, epoch=1)
    assert not torch.equal(e0[0][0], e1[0][0])
    tail = epoch_batches(bundle, epoch=1, start=3)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(tail, e1[3:]))
    assert len(tail) == len(e1) - 3


def test_ranks_split_each_global_batch():
    """Rank r's i-th batch is the r-th slice of the single-process i-th batch (augmented alike)."""
    single = epoch_batches(build_data(data_cfg(), seed=0))
    ranks = [epoch_batches(build_data(data_cfg(), rank=r, world_size=2, seed=0)) for r in (0, 1)]
    for i, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)


def test_class_balanced_resampling_balances_labels():
    bundle = build_data(data_cfg("data.rho=50", "data.n_max=200"), seed=0)
    counts = torch.zeros(10)
    for _ in range(3):
        for _, y in epoch_batches(bundle, "class_aware"):
            counts += torch.bincount(y, minlength=10)
    share = counts / counts.sum()
    assert share.min() > 0.07 and share.max() < 0.13, share


def test_errors_name_the_problem(tmp_path):
    bundle = build_data(data_cfg(), seed=0)
    with pytest.raises(DataError, match="splits train/test.*data.val_per_class"):
        bundle.eval_loader("val")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        build_data(data_cfg(f"data.root={tmp_path}"))
    with pytest.raises(ConfigError, match=r"data.stats = 'mnist' is not allowed"):
        data_cfg("data.stats=mnist")           # the config refuses it before anything runs
    cfg = data_cfg()
    cfg.stats = "mnist"                        # and the data pipeline still names it
    with pytest.raises(DataError, match="normalization statistics"):
        build_data(cfg)
