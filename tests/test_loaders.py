"""The loader backends (torchvision, DALI, FFCV) behind one interface: same order, same
sharding, same output format, bad data reported with its path, and the engine end to end.

A backend that is not installed is skipped with the package to install. FFCV compiles each
pipeline with numba on first use (seconds), so the tests share data sets, batch sizes and thus
compiled pipelines, and give FFCV one thread (its compile is much slower in parallel mode).
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from ltrainer.data_pipelines.augment import DEFAULT_STATS, build_transform
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.loaders import (INSTALL_HINTS, BackendUnavailable, backend_status,
                                    choose_backend, make_eval_loader, make_train_loader)
from ltrainer.data_pipelines.samplers import SequentialSampler, build_sampler
from ltrainer.data_pipelines.sources import DataError, SubsetSource, read_fashion_mnist, read_list_file
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist
BACKENDS = ("torchvision", "dali", "ffcv")
MODULES = {"dali": "nvidia.dali", "ffcv": "ffcv"}
# Long-tailed class counts of the small array data set (320 Fashion-MNIST test images).
COUNTS = [80, 60, 45, 35, 28, 22, 18, 14, 10, 8]
BATCH = 32


def _backend_param(name):
    installed = name not in MODULES or importlib.util.find_spec(MODULES[name]) is not None
    return pytest.param(name, marks=pytest.mark.skipif(
        not installed, reason=f"{name} not installed: {INSTALL_HINTS.get(name)}"))


each_backend = pytest.mark.parametrize("backend", [_backend_param(b) for b in BACKENDS])


def need(backend):
    ok, why = backend_status(backend)
    if not ok:
        pytest.skip(f"{backend} cannot be imported ({why}): {INSTALL_HINTS[backend]}")


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    return str(tmp_path_factory.mktemp("betons"))


@pytest.fixture(scope="module")
def lt_source():
    """320 distinct Fashion-MNIST test images, long-tailed (COUNTS), as an array source."""
    full = read_fashion_mnist(train=False)
    idx = np.concatenate([np.nonzero(full.labels == c)[0][:n] for c, n in enumerate(COUNTS)])
    return SubsetSource(full, np.sort(idx))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """64 tinted 64-px JPEGs and their list file."""
    from ltrainer.tools.bench_loaders import make_jpeg_set

    d = tmp_path_factory.mktemp("jpegs")
    return read_list_file(make_jpeg_set(str(d), n=64, size=64))


def make(backend, source, augment, train, sampler, betons, *, size=28, stats="fashion_mnist",
         batch=BATCH, seed=3, **cfg_over):
    """A loader of ``backend`` for ``source``, built as DataBundle builds it."""
    need(backend)
    mean, std = DEFAULT_STATS[stats]
    try:
        transform = build_transform(augment, train, size, mean, std, len(mean))
    except ValueError as exc:
        if backend == "torchvision":
            pytest.skip(f"torchvision has no {augment!r} recipe yet: {exc}")
        transform = None
    cfg = {"source": "list", "stats": stats, "augment": augment, "image_size": size,
           "workers": 1 if backend == "ffcv" else 0, "dali_threads": 1, "dali_device": "cpu",
           "beton_dir": betons, "on_bad_image": "fail", "loader": backend, **cfg_over}
    build = make_train_loader if train else make_eval_loader
    return build(cfg, AugmentedDataset(source, transform), sampler, batch_size=batch, seed=seed,
                 in_channels=len(mean))


def collect(loader):
    """All batches of one epoch (cloned: FFCV batches are views of reused buffers)."""
    return [(x.detach().cpu().clone(), y.detach().cpu().clone()) for x, y in loader]


def sampler_items(sampler):
    return [k[0] if isinstance(k, tuple) else k for k in sampler]


def identify(backend, source, betons, batches):
    """Map delivered 'none'-recipe images back to item indices (images are distinct)."""
    ref = collect(make(backend, source, "none", False, SequentialSampler(len(source)), betons,
                       batch=64))
    index = {img.numpy().tobytes(): i for i, img in enumerate(torch.cat([x for x, _ in ref]))}
    assert len(index) == len(source), "test images must be distinct"
    return [index[img.numpy().tobytes()] for x, _ in batches for img in x]


# ----------------------------------------------------------------------------- order, sharding

@each_backend
def test_uniform_epoch_delivers_each_sample_exactly_once_in_sampler_order(backend, lt_source,
                                                                          betons):
    sampler = build_sampler("uniform", lt_source.labels, batch_size=BATCH, seed=1)
    loader = make(backend, lt_source, "none", True, sampler, betons)
    sampler.set_epoch(2)
    got = identify(backend, lt_source, betons, collect(loader))
    assert got == sampler_items(sampler)                     # same order as torchvision's
    assert sorted(got) == list(range(len(lt_source)))        # no loss, no duplicates


@each_backend
def test_ddp_shards_are_disjoint_cover_the_data_and_reseed_per_epoch(backend, lt_source,
                                                                     betons):
    world = 2
    epochs = {}
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            sampler = build_sampler("uniform", lt_source.labels, batch_size=BATCH,
                                    world_size=world, rank=rank, seed=1)
            loader = make(backend, lt_source, "none", True, sampler, betons)
            sampler.set_epoch(epoch)
            shards.append(identify(backend, lt_source, betons, collect(loader)))
            assert shards[-1] == sampler_items(sampler)
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(len(lt_source)))
        epochs[epoch] = shards
    assert epochs[0][0] != epochs[1][0]


@each_backend
@pytest.mark.parametrize("kind", ["class_aware", "sqrt", "cb"])
def test_resampling_order_and_mid_epoch_resume(backend, kind, lt_source, betons):
    """Labels come out in the sampler's order for every sampler kind, also when an epoch is
    resumed mid-way; class-aware sampling balances the classes."""
    weights = 1.0 / np.asarray(COUNTS, dtype=np.float64) if kind == "cb" else None
    sampler = build_sampler(kind, lt_source.labels, batch_size=BATCH, seed=4,
                            class_weights=weights)
    loader = make(backend, lt_source, "small", True, sampler, betons)
    sampler.set_epoch(1)
    labels = torch.cat([y for _, y in collect(loader)])
    assert labels.dtype == torch.int64
    assert labels.tolist() == lt_source.labels[sampler_items(sampler)].tolist()
    it = iter(loader)       # an epoch left after one batch (engine.max_steps) ...
    next(it)
    del it
    sampler.set_epoch(1, start_batch=3)   # ... does not disturb the next one
    tail = torch.cat([y for _, y in collect(loader)])
    assert tail.tolist() == labels[3 * BATCH:].tolist()
    if kind == "class_aware":
        share = torch.bincount(labels, minlength=10).double() / len(labels)
        assert share.min() > 0.06 and share.max() < 0.14, share


# ----------------------------------------------------------------------------- same outputs

RECIPES = {   # name: (source fixture, augment, train, size, stats)
    "small-train": ("lt_source", "small", True, 28, "fashion_mnist"),
    "small-eval": ("lt_source", "small", False, 28, "fashion_mnist"),
    "imagenet-train": ("jpegs", "imagenet", True, 48, "imagenet"),
    "imagenet-eval": ("jpegs", "imagenet", False, 48, "imagenet"),
    "moco-train": ("jpegs", "moco", True, 48, "imagenet"),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_outputs_match_across_backends(recipe, request, betons):
    """Shape, dtype, layout and normalization agree; eval images agree pixel-wise up to the
    backends' resize/JPEG differences."""
    src_name, augment, train, size, stats = RECIPES[recipe]
    source = request.getfixturevalue(src_name)
    out = {}
    for backend in BACKENDS:
        if not backend_status(backend)[0]:
            continue
        sampler = (build_sampler("uniform", source.labels, batch_size=BATCH, seed=0) if train
                   else SequentialSampler(len(source)))
        try:
            loader = make(backend, source, augment, train, sampler, betons, size=size,
                          stats=stats)
        except pytest.skip.Exception:
            continue
        out[backend] = collect(loader)
    if len(out) < 2:
        pytest.skip(f"fewer than two backends can run {recipe}")
    channels = len(DEFAULT_STATS[stats][0])
    views = (2,) if augment == "moco" else ()
    ref_name = "torchvision" if "torchvision" in out else sorted(out)[0]
    ref_x = torch.cat([x for x, _ in out[ref_name]])
    for backend, batches in out.items():
        x, y = batches[0]
        assert tuple(x.shape) == (len(y), *views, channels, size, size), backend
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.dim() == 1, backend
        assert x.is_contiguous(), f"{backend}: expected contiguous NCHW"
        assert [len(b[1]) for b in batches] == [len(b[1]) for b in out[ref_name]], backend
        all_x = torch.cat([b[0] for b in batches])
        assert abs(all_x.mean() - ref_x.mean()) < 0.15, (backend, all_x.mean(), ref_x.mean())
        assert abs(all_x.std() - ref_x.std()) < 0.15, (backend, all_x.std(), ref_x.std())
        if not train:
            assert torch.equal(torch.cat([b[1] for b in batches]),
                               torch.cat([b[1] for b in out[ref_name]]))
            assert (all_x - ref_x).abs().mean() < 0.12, (backend, (all_x - ref_x).abs().mean())


@each_backend
def test_eval_is_deterministic(backend, jpegs, betons):
    loader = make(backend, jpegs, "imagenet", False, SequentialSampler(len(jpegs)), betons,
                  size=48, stats="imagenet")
    a, b = collect(loader), collect(loader)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_ffcv_normalizing_on_the_device_matches_normalizing_in_numba(jpegs, lt_source,
                                                                       betons):
    """On GPU machines FFCV hands uint8 to the device and normalizes there; that path (run
    here on the CPU) must give the numba path's output."""
    need("ffcv")
    from ltrainer.data_pipelines.ffcv_loader import FfcvLoader, ensure_beton
    from ltrainer.data_pipelines.loaders import augment_spec

    for src, augment, size, stats in [(jpegs, "imagenet", 48, "imagenet"),
                                      (lt_source, "small", 28, "fashion_mnist")]:
        channels = len(DEFAULT_STATS[stats][0])
        cfg = {"augment": augment, "image_size": size, "stats": stats, "source": "list"}
        path = ensure_beton(src, betons)
        out = []
        for device in (None, "cpu"):
            loader = FfcvLoader(path, AugmentedDataset(src), SequentialSampler(len(src)), BATCH,
                                augment_spec(cfg, False, channels), threads=1, device=device)
            out.append(collect(loader))
        for (xa, ya), (xb, yb) in zip(*out):
            assert xb.is_contiguous() and xb.shape == xa.shape and torch.equal(ya, yb)
            torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-4)
    sampler = build_sampler("uniform", jpegs.labels, batch_size=BATCH, seed=0)
    spec = augment_spec({"augment": "imagenet", "image_size": 48, "stats": "imagenet",
                         "source": "list"}, True, 3)
    x, y = collect(FfcvLoader(ensure_beton(jpegs, betons), AugmentedDataset(jpegs), sampler,
                              BATCH, spec, threads=1, device="cpu"))[0]
    assert x.shape == (BATCH, 3, 48, 48) and x.dtype == torch.float32 and x.is_contiguous()


# ----------------------------------------------------------------------------- bad data

@pytest.fixture(scope="module")
def bad_list(jpegs, tmp_path_factory):
    """The JPEG list plus a garbage '.jpg', a truncated JPEG and a missing file."""
    d = tmp_path_factory.mktemp("bad")
    good = [f"{jpegs.full_path(i)} {int(jpegs.labels[i])}" for i in range(24)]
    (d / "garbage.jpg").write_bytes(os.urandom(3000))
    whole = open(jpegs.full_path(0), "rb").read()
    (d / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    lines = good[:5] + [f"{d / 'garbage.jpg'} 1"] + good[5:12] + [f"{d / 'truncated.jpg'} 2"] \
        + good[12:20] + [f"{d / 'missing.jpg'} 3"] + good[20:]
    (d / "bad.txt").write_text("\n".join(lines) + "\n")
    return read_list_file(str(d / "bad.txt"), root="/")


@each_backend
def test_bad_images_are_reported_with_their_path_or_skipped(backend, bad_list, betons,
                                                            tmp_path):
    sampler = SequentialSampler(len(bad_list))
    kw = dict(size=48, stats="imagenet", batch=8)
    with pytest.raises(Exception) as info:
        collect(make(backend, bad_list, "imagenet", False, sampler, str(tmp_path / "f"), **kw))
    msg = str(info.value)
    print(f"{backend}: {type(info.value).__name__}: {msg}")
    assert "garbage.jpg" in msg or "truncated.jpg" in msg or "missing.jpg" in msg, msg
    assert isinstance(info.value, DataError) or "DataError" in msg, msg
    if backend == "ffcv":   # the failed conversion left no .beton behind
        assert not [f for f in os.listdir(tmp_path / "f") if ".beton" in f]

    loader = make(backend, bad_list, "imagenet", False, sampler, str(tmp_path / "s"),
                  on_bad_image="skip", **kw)
    labels = torch.cat([y for _, y in collect(loader)])
    assert len(labels) == len(bad_list) - 3
    assert loader.skipped == 3


@pytest.mark.parametrize("head", ["garbage", "frame header"])
def test_dali_decoder_failure_is_blamed_on_the_file(head, jpegs, tmp_path):
    """A file that passes the cheap marker checks but breaks DALI's decoder is named, and in
    skip mode the epoch goes on without it: garbage after the markers already fails the
    feeder's header read (the crop window needs the size), a real frame header before the
    garbage gets as far as DALI's decoder."""
    need("dali")
    sneaky = tmp_path / "sneaky.jpg"
    start = b"\xff\xd8\xff\xe0"
    if head == "frame header":     # a real JPEG up to the end of its start-of-frame segment
        whole = open(jpegs.full_path(0), "rb").read()
        sof = whole.index(b"\xff\xc0")
        start = whole[:sof + 2 + int.from_bytes(whole[sof + 2:sof + 4], "big")]
    sneaky.write_bytes(start + os.urandom(3000) + b"\xff\xd9")
    lines = [f"{jpegs.full_path(i)} {int(jpegs.labels[i])}" for i in range(15)]
    lines.insert(9, f"{sneaky} 1")
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    src = read_list_file(str(tmp_path / "l.txt"), root="/")
    sampler = build_sampler("uniform", src.labels, batch_size=4, seed=0)
    caught_by = "bad image" if head == "garbage" else "DALI could not decode"
    with pytest.raises(DataError, match=f"{caught_by}: .*sneaky.jpg"):
        collect(make("dali", src, "imagenet", True, sampler, str(tmp_path), size=48,
                     stats="imagenet", batch=4))
    loader = make("dali", src, "imagenet", True, sampler, str(tmp_path), size=48,
                  stats="imagenet", batch=4, on_bad_image="skip")
    labels = torch.cat([y for _, y in collect(loader)])
    assert len(labels) == 15 and loader.skipped == 1


class _FixedKeys:
    """A sampler that gives the same (index, seed) keys every epoch."""

    def __init__(self, keys):
        self.keys = list(keys)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)

    def set_epoch(self, epoch, start_batch=0):
        pass


@pytest.mark.parametrize("augment,data", [("imagenet", "jpegs"), ("imagenet", "lt_source"),
                                          ("moco", "jpegs")])
def test_dali_train_pixels_depend_on_the_sample_seed_only(augment, data, request, betons):
    """Every DALI draw (crop window, flip, MoCo's colour stage) comes from the sample's seed:
    the same (index, seed) gives the same pixels in the next epoch, from a loader with another
    loader seed, batch size and key order; other seeds give other crops."""
    need("dali")
    src = request.getfixturevalue(data)
    n, kw = min(len(src), 96), dict(size=48 if data == "jpegs" else 28,
                                    stats="imagenet" if data == "jpegs" else "fashion_mnist")
    keys = [(i, 1000 + 7919 * i) for i in range(n)]

    def per_item(loader):
        out = {}
        for x, _ in loader:
            out.update(zip(torch.as_tensor(loader.batch_indices).tolist(), x.clone()))
        assert sorted(out) == list(range(n))
        return out

    a = make("dali", src, augment, True, _FixedKeys(keys), betons, batch=16, **kw)
    first, again = per_item(a), per_item(a)
    other = per_item(make("dali", src, augment, True, _FixedKeys(keys[::-1]), betons, batch=12,
                          seed=99, **kw))
    changed = [i for i in range(n)
               if not (torch.equal(first[i], again[i]) and torch.equal(first[i], other[i]))]
    assert not changed, f"{len(changed)} of {n} samples changed, e.g. {changed[:5]}"
    reseeded = per_item(make("dali", src, augment, True,
                             _FixedKeys([(i, s + 1) for i, s in keys]), betons, batch=16, **kw))
    assert sum(not torch.equal(first[i], reseeded[i]) for i in range(n)) >= 0.9 * n


def test_image_sizes_from_the_header(tmp_path):
    """DALI's feeder and the torchvision fast path need each file's size for its crop window:
    a JPEG's frame header (after EXIF / ICC segments; baseline, progressive, gray, with its
    component count), other formats through PIL."""
    from PIL import Image

    from ltrainer.data_pipelines.image_header import encoded_hw, jpeg_frame

    rng = np.random.default_rng(0)
    cases = [("RGB", "a.jpg", {"quality": 90}), ("RGB", "b.jpg", {"progressive": True}),
             ("L", "c.jpg", {}), ("RGB", "d.jpg", {"icc_profile": os.urandom(60000),
                                                   "exif": Image.Exif().tobytes()}),
             ("RGB", "e.png", {}), ("L", "f.bmp", {})]
    for k, (mode, name, kw) in enumerate(cases):
        h, w = 37 + 11 * k, 90 - 7 * k
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
            tmp_path / name, **kw)
        data = np.fromfile(tmp_path / name, np.uint8)
        assert encoded_hw(data) == (h, w), name
        jpeg = name.endswith(".jpg")
        assert jpeg_frame(data) == ((h, w, 3 if mode == "RGB" else 1) if jpeg else None), name
    assert jpeg_frame(b"\xff\xd8\xff") is None and jpeg_frame(np.zeros(0, np.uint8)) is None


def test_write_beton_cli_is_atomic_and_names_the_bad_file(bad_list, jpegs, tmp_path, capsys):
    need("ffcv")
    from ltrainer.tools.write_beton import main

    out = tmp_path / "x.beton"
    assert main(["--list", bad_list.origin_of(0).rsplit(":", 1)[0], "--root", "/",
                 "--out", str(out), "--workers", "1"]) == 2
    assert "garbage.jpg" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())                     # nothing half-written, no temp
    assert main(["--list", jpegs.origin_of(0).rsplit(":", 1)[0], "--out", str(out),
                 "--max-side", "32", "--jpeg-quality", "80", "--workers", "1"]) == 0
    meta = json.loads((tmp_path / "x.beton.json").read_text())
    assert meta["items"] == len(jpegs) and meta["max_side"] == 32 and meta["bad"] == []


class _DyingSource:
    """A source whose loading kills the process on item 25 (as the OOM killer would)."""
    name, in_channels, num_classes = "dying", 3, 2
    labels = np.zeros(40, np.int64)

    def __len__(self):
        return 40

    def load(self, i):
        if i == 25:
            os._exit(3)
        return np.full((16, 16, 3), i, np.uint8)

    def describe(self, i):
        return f"dying[{i}]"


def test_write_beton_reports_a_dead_writer_process_instead_of_hanging(tmp_path):
    need("ffcv")
    from ltrainer.data_pipelines.ffcv_loader import write_beton

    with pytest.raises(DataError, match="writer process died"):
        write_beton(_DyingSource(), str(tmp_path / "x.beton"), workers=2)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- choice

def test_backend_choice_and_missing_backend_error(monkeypatch, lt_source, tmp_path):
    import ltrainer.data_pipelines.loaders as L
    ds = AugmentedDataset(lt_source)
    cfg = {"loader": "auto", "beton_dir": str(tmp_path)}
    monkeypatch.setattr(L, "cuda_device", lambda: None)
    assert choose_backend(cfg, ds) == "torchvision"          # CPU and no .beton
    if backend_status("ffcv")[0]:
        from ltrainer.data_pipelines.ffcv_loader import beton_path_for

        open(beton_path_for(lt_source, str(tmp_path)), "w").close()
        assert choose_backend(cfg, ds) == "ffcv"              # a .beton exists
    if backend_status("dali")[0]:
        monkeypatch.setattr(L, "cuda_device", lambda: 0)
        assert choose_backend(cfg, ds) == "dali"              # a GPU and DALI
    monkeypatch.setitem(L._STATUS, "dali", (False, "ImportError: No module named 'nvidia'"))
    with pytest.raises(BackendUnavailable, match="pip install nvidia-dali-cuda130"):
        choose_backend({"loader": "dali"}, ds)


# ----------------------------------------------------------------------------- engine

@each_backend
def test_engine_trains_fashion_mnist_lt_end_to_end(backend, tiny, tmp_path, betons):
    need(backend)
    from tests.conftest import ROOT
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.engine import train

    name = "fmnist_lt_ce" + ("" if backend == "torchvision" else f"_{backend}")
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"),
                      tiny + ["sched.epochs=1", "sched.milestones=[1]", "data.n_max=40",
                              "data.rho=4", "data.workers=1",
                              "data.dali_threads=1", f"data.beton_dir={betons}",
                              f"run.name={backend}"])
    res = train(cfg)
    assert res["epochs"] == 1 and res["global_step"] == res["class_count_summary"]["images"] // 32
    assert np.isfinite(res["balanced_error"]) and res["balanced_error"] < 90
    assert (tmp_path / backend / "results.json").exists()


@each_backend
def test_skipping_loaders_report_the_dataset_indices_they_delivered(backend, bad_list, betons,
                                                                   tmp_path):
    """The engine orders evaluation rows by these (a skipped image must not shift the rows
    after it, nor mix up the ranks' shards)."""
    sampler = SequentialSampler(len(bad_list), world_size=2, rank=1)   # items 1, 3, 5, ...
    loader = make(backend, bad_list, "imagenet", False, sampler, str(tmp_path / "s"),
                  size=48, stats="imagenet", batch=4, on_bad_image="skip")
    got = []
    for x, y in loader:
        ids = torch.as_tensor(loader.batch_indices).tolist()
        assert len(ids) == len(x) == len(y)
        got += ids
    assert got == [i for i in range(1, len(bad_list), 2) if i not in (5, 13, 22)]


def test_dali_reads_files_off_the_training_thread(jpegs, betons, monkeypatch):
    """DALI calls a non-parallel external source on the thread that runs the pipeline (the
    training thread); the feeder's file reads go to a thread pool instead."""
    import threading

    need("dali")
    from ltrainer.data_pipelines.dali_loader import DaliLoader

    threads, read = set(), DaliLoader.read
    monkeypatch.setattr(DaliLoader, "read", lambda self, i: (
        threads.add(threading.current_thread().name), read(self, i))[1])
    loader = make("dali", jpegs, "imagenet", False, SequentialSampler(len(jpegs)), betons,
                  size=48, stats="imagenet", batch=8)
    assert sum(len(y) for _, y in loader) == len(jpegs)
    assert threads and all(t.startswith("dali-read") for t in threads), threads


def test_ffcv_device_path_builds_its_constants_once_and_copies_in_ffcvs_thread(jpegs, betons,
                                                                               monkeypatch):
    """Issue 18 item 8: mean/std were rebuilt on the device for every view of every batch, and
    a non_blocking copy out of FFCV's pinned ring buffer could race FFCV's refill of it. Issue
    14: the copy is FFCV's ToDevice, in FFCV's thread (the training thread copies nothing), and
    it blocks that thread, so the pinned slot is free when FFCV refills it."""
    need("ffcv")
    import threading

    from ffcv.transforms import ToDevice

    from ltrainer.data_pipelines import ffcv_loader
    from ltrainer.data_pipelines.loaders import augment_spec

    cfg = {"augment": "imagenet", "image_size": 48, "stats": "imagenet", "source": "list"}
    loader = ffcv_loader.FfcvLoader(ffcv_loader.ensure_beton(jpegs, betons),
                                    AugmentedDataset(jpegs), SequentialSampler(len(jpegs)), BATCH,
                                    augment_spec(cfg, False, 3), threads=1, device="cpu")
    first = collect(loader)
    assert len(loader._constants) == 1
    to_device = [op for spec in loader.loader.pipeline_specs.values()
                 for op in spec.transforms if isinstance(op, ToDevice)]
    assert to_device and all(not op.non_blocking for op in to_device)
    moves, copiers = [], set()
    real_to, real_copy = torch.Tensor.to, torch.Tensor.copy_

    def spy_to(self, *args, **kw):
        moves.append(threading.current_thread() is threading.main_thread())
        return real_to(self, *args, **kw)

    def spy_copy(self, src, non_blocking=False):
        copiers.add(threading.current_thread() is threading.main_thread())
        return real_copy(self, src, non_blocking)

    def no_new_tensors(*a, **k):
        raise AssertionError("device constants rebuilt for a batch")

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch.Tensor, "copy_", spy_copy)
    monkeypatch.setattr(ffcv_loader.torch, "tensor", no_new_tensors)
    again = collect(loader)
    monkeypatch.undo()
    assert copiers == {False}                  # copied by FFCV's thread only
    assert not any(moves)                      # the training thread moves nothing
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
