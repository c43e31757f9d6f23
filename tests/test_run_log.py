"""data_pipelines' `logging` records (skipped images, ...) reach run.log while a run is open
on rank 0 (trainer/run_log.py), and only the run that is open gets them (issue 17 item 4)."""
from __future__ import annotations

import logging
import os

import pytest

from ltrainer.data_pipelines.samplers import SequentialSampler
from ltrainer.data_pipelines.sources import read_list_file
from tests.conftest import needs_fmnist
from ltrainer.trainer.run_log import RunLog


def _lines(run_dir):
    with open(os.path.join(run_dir, "run.log")) as f:
        return f.read()


def test_library_warnings_go_to_the_open_run_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = RunLog(str(a), enabled=True, progress="lines", prefix="stage 1/2 (ce)")
    logging.getLogger("data_pipelines.ffcv").warning("wrote %d images", 7)
    second = RunLog(str(b), enabled=True, progress="lines")   # the next stage opens
    logging.getLogger("data_pipelines.loaders").warning("second stage")
    first.close()   # closing an earlier run leaves the open one attached
    logging.getLogger("trainer.x").warning("still second")
    second.close()
    logging.getLogger("data_pipelines").warning("after every run closed")
    assert "stage 1/2 (ce): warning (data_pipelines.ffcv): wrote 7 images" in _lines(a)
    assert "second stage" not in _lines(a)
    assert "second stage" in _lines(b) and "still second" in _lines(b)
    assert "after every run closed" not in _lines(a) + _lines(b)
    for name in ("data_pipelines", "trainer"):
        assert not [h for h in logging.getLogger(name).handlers
                    if type(h).__name__ == "_ToRunLog"]


def test_other_ranks_write_no_run_log(tmp_path):
    log = RunLog(str(tmp_path), enabled=False)
    logging.getLogger("data_pipelines.loaders").warning("rank 1 skipped one")
    log.close()
    assert not os.path.exists(tmp_path / "run.log")


@needs_fmnist
def test_a_skipped_image_is_in_run_log(tmp_path):
    """The loader's own warning, from a real torchvision loader in skip mode."""
    from ltrainer.data_pipelines.augment import DEFAULT_STATS, build_transform
    from ltrainer.data_pipelines.datasets import AugmentedDataset
    from ltrainer.data_pipelines.loaders import make_train_loader
    from ltrainer.tools.bench_loaders import make_jpeg_set

    good = read_list_file(make_jpeg_set(str(tmp_path / "jpegs"), n=6, size=32))
    (tmp_path / "garbage.jpg").write_bytes(os.urandom(2000))
    lines = [f"{good.full_path(i)} {int(good.labels[i])}" for i in range(6)]
    lines.insert(3, f"{tmp_path / 'garbage.jpg'} 1")
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    source = read_list_file(str(tmp_path / "bad.txt"), root="/")
    mean, std = DEFAULT_STATS["imagenet"]
    cfg = {"source": "list", "stats": "imagenet", "augment": "none", "image_size": 32,
           "workers": 0, "dali_threads": 1, "dali_device": "cpu", "beton_dir": str(tmp_path),
           "on_bad_image": "skip", "loader": "torchvision"}
    dataset = AugmentedDataset(source, build_transform("none", True, 32, mean, std, 3))
    loader = make_train_loader(cfg, dataset, SequentialSampler(len(source)), batch_size=4,
                               seed=0, in_channels=3)
    run = tmp_path / "run"
    run.mkdir()
    log = RunLog(str(run), enabled=True, progress="lines")
    try:
        assert sum(len(y) for _, y in loader) == 6
    finally:
        log.close()
    text = _lines(run)
    assert "skipped bad image" in text and "garbage.jpg" in text, text
