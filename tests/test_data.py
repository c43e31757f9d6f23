"""Tests for data_pipelines: sources, long-tail subsets, transforms, datasets, the LT tool."""

import gzip
import json
import os
import pickle  # only to write fake CIFAR batches in CIFAR's distributed (pickle) format
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ltrainer.data_pipelines.augment import DEFAULT_STATS, build_transform
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.longtail import (SVHN_CLASS_ORDER, class_counts, lt_counts, lt_indices,
                                     make_lt_subset)
from ltrainer.data_pipelines.samplers import build_sampler
from ltrainer.data_pipelines.sources import (ArraySource, DataError, FileSource, SubsetSource,
                                    open_source, read_cifar, read_fashion_mnist,
                                    read_image_folder, read_index_list, read_list_file,
                                    read_svhn)
from ltrainer.data_pipelines.torchvision_loader import build_torchvision_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- long tail

def test_lt_counts_cifar10_rho100_exact():
    counts = lt_counts(10, 5000, 100, "exp")
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_lt_counts_cifar100_ends_and_step_and_none():
    c100 = lt_counts(100, 500, 100)
    assert c100[0] == 500 and c100[-1] == 5 and len(c100) == 100
    assert all(a >= b for a, b in zip(c100, c100[1:]))
    assert lt_counts(10, 5000, 100, "step") == [5000] * 5 + [50] * 5
    assert lt_counts(10, 5000, 10, "step") == [5000] * 5 + [500] * 5
    assert lt_counts(5, 100, 10, "step") == [100, 100, 10, 10, 10]  # odd C: tail gets the rest
    assert lt_counts(4, 7, 100, "none") == [7, 7, 7, 7]
    with pytest.raises(ValueError, match="profile"):
        lt_counts(10, 5000, 100, "linear")


def _reference_lt(labels, counts, seed, classes):
    """The reference procedure verbatim in spirit: global np.random.seed, then per class."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = []
        for c, n in zip(classes, counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            out.append(idx[:n])
        return np.concatenate(out)
    finally:
        np.random.set_state(state)


def test_lt_indices_matches_reference_and_keeps_global_rng():
    labels = np.repeat(np.arange(10), 5000)
    np.random.RandomState(3).shuffle(labels)
    counts = lt_counts(10, 5000, 100)
    before = np.random.get_state()[1].copy()
    for seed in (0, 1):
        ours = lt_indices(labels, counts, seed=seed)
        assert np.array_equal(ours, _reference_lt(labels, counts, seed, range(10)))
    assert np.array_equal(np.random.get_state()[1], before)
    ours = lt_indices(labels, counts)
    assert class_counts(labels[ours], 10) == counts
    assert len(np.unique(ours)) == 12406


def test_lt_indices_svhn_rotation():
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 10, 30000)
    counts = lt_counts(10, 1000, 100)
    idx = lt_indices(labels, counts, seed=0, class_order=SVHN_CLASS_ORDER)
    assert np.array_equal(idx, _reference_lt(labels, counts, 0, SVHN_CLASS_ORDER))
    per_class = class_counts(labels[idx], 10)
    assert per_class[0] == counts[-1] == 10       # digit 0 is the rarest
    assert per_class[1] == counts[0] == 1000      # digit 1 is the head
    assert per_class[1:] == counts[:-1]


def test_lt_indices_not_enough_images():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(DataError, match="class 1 has only 3 images"):
        lt_indices(labels, [5, 4])


def test_make_lt_subset_on_array_source():
    imgs = np.zeros((200, 4, 4, 3), np.uint8)
    labels = np.repeat(np.arange(4), 50)
    src = ArraySource(imgs, labels, 4, "toy")
    sub = make_lt_subset(src, rho=10)
    assert isinstance(sub, SubsetSource)
    assert class_counts(sub.labels, 4) == lt_counts(4, 50, 10) == [50, 23, 10, 5]
    assert sub.describe(0).startswith("toy[")


# ----------------------------------------------------------------------------- readers

@pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files():
    train = read_fashion_mnist(FMNIST, train=True)
    test = read_fashion_mnist(FMNIST, train=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.num_classes == 10 and train.in_channels == 1
    assert class_counts(train.labels, 10) == [6000] * 10
    assert int(train.labels[0]) == 9  # the first training image is an ankle boot
    img = train.load(0)
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28)
    mean, std = DEFAULT_STATS["fashion_mnist"]
    x = train.images[:5000].astype(np.float64) / 255
    assert abs(x.mean() - mean[0]) < 0.01 and abs(x.std() - std[0]) < 0.01


def _write_idx(path, magic, arr, gz):
    data = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in arr.shape)
    data += arr.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def test_fake_idx_reader_gz_and_plain(tmp_path):
    imgs = np.random.RandomState(0).randint(0, 256, (7, 28, 28)).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9], np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, imgs, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, labels, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", 2051, imgs[:3], gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", 2049, labels[:3], gz=False)
    tr = read_fashion_mnist(str(tmp_path), train=True)
    te = read_fashion_mnist(str(tmp_path), train=False)
    assert len(tr) == 7 and len(te) == 3
    assert np.array_equal(tr.images, imgs) and tr.labels.tolist() == labels.tolist()
    assert torch.equal(tr.load(2)[0], torch.from_numpy(imgs[2]))
    assert open_source("fashion_mnist", str(tmp_path), "test", None).labels.tolist() == [0, 1, 2]


def test_fake_idx_bad_magic_and_missing(tmp_path):
    imgs = np.zeros((2, 28, 28), np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", 2049, imgs, gz=False)  # wrong magic
    _write_idx(tmp_path / "train-labels-idx1-ubyte", 2049, np.zeros(2, np.uint8), gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: bad IDX magic.*2051"):
        read_fashion_mnist(str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        read_fashion_mnist(str(tmp_path / "nowhere"))


def _fake_cifar(root, name):
    rng = np.random.RandomState(1)
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir()
        files = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
        key = b"labels"
    else:
        d = root / "cifar-100-python"
        d.mkdir()
        files, key = ["train", "test"], b"fine_labels"
    made = {}
    for i, fn in enumerate(files):
        data = rng.randint(0, 256, (4, 3072)).astype(np.uint8)
        labels = [(i + j) % (10 if name == "cifar10" else 100) for j in range(4)]
        batch = {b"data": data, key: labels, b"coarse_labels": [0] * 4}
        with open(d / fn, "wb") as f:
            pickle.dump(batch, f)
        made[fn] = (data, labels)
    return made


def test_fake_cifar10_and_cifar100(tmp_path):
    made = _fake_cifar(tmp_path, "cifar10")
    tr = read_cifar(str(tmp_path), "cifar10", train=True)
    te = read_cifar(str(tmp_path), "cifar10", train=False)
    assert len(tr) == 20 and len(te) == 4 and tr.num_classes == 10 and tr.in_channels == 3
    data, labels = made["data_batch_2"]
    assert tr.labels[4:8].tolist() == labels
    # row layout is 1024 R, then G, then B values; load() gives CHW
    assert torch.equal(tr.load(4), torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert tr.describe(4) == "cifar10[4]"
    c100_root = tmp_path / "c100"
    c100_root.mkdir()
    made = _fake_cifar(c100_root, "cifar100")
    src = open_source("cifar100", str(c100_root), "test", None)
    assert src.num_classes == 100 and src.labels.tolist() == made["test"][1]
    with pytest.raises(DataError, match="cifar-100-python"):
        read_cifar(str(tmp_path), "cifar100")


def test_fake_svhn(tmp_path):
    import scipy.io

    rng = np.random.RandomState(2)
    x = rng.randint(0, 256, (32, 32, 3, 5)).astype(np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], np.uint8)
    scipy.io.savemat(str(tmp_path / "train_32x32.mat"), {"X": x, "y": y})
    src = read_svhn(str(tmp_path), "train")
    assert src.labels.tolist() == [0, 1, 2, 0, 9] and src.num_classes == 10
    assert torch.equal(src.load(3), torch.from_numpy(x[:, :, :, 3]).permute(2, 0, 1))
    with pytest.raises(DataError, match="test_32x32.mat"):
        open_source("svhn", str(tmp_path), "test", None)


def _write_png(path, color=(10, 20, 30), size=(8, 6)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_list_file_reader(tmp_path):
    _write_png(str(tmp_path / "imgs" / "a b.png"))
    _write_png(str(tmp_path / "imgs" / "c.png"), color=(200, 0, 0))
    lst = tmp_path / "train.txt"
    lst.write_text("imgs/a b.png 1\n\n  \nimgs/c.png\t0\n")
    src = read_list_file(str(lst), str(tmp_path), check_files=True)
    assert isinstance(src, FileSource)
    assert src.paths == ["imgs/a b.png", "imgs/c.png"] and src.labels.tolist() == [1, 0]
    assert src.num_classes == 2 and src.in_channels == 3
    img = src.load(1)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 0, 0)
    assert f"{lst}:4" in src.describe(1)
    # root defaults to the list's folder
    assert read_list_file(str(lst), None).load(0).size == (8, 6)
    with pytest.raises(DataError, match=r"label 1 out of range"):
        read_list_file(str(lst), str(tmp_path), num_classes=1)


@pytest.mark.parametrize("line, match", [
    ("imgs/a.png", r"train\.txt:2: malformed line.*'relative/path label'"),
    ("imgs/a.png cat", r"train\.txt:2: label 'cat' is not an integer"),
    ("imgs/a.png -1", r"train\.txt:2: label -1 is negative"),
])
def test_list_file_bad_lines_name_file_and_line(tmp_path, line, match):
    lst = tmp_path / "train.txt"
    lst.write_text(f"imgs/ok.png 0\n{line}\n")
    with pytest.raises(DataError, match=match):
        read_list_file(str(lst), str(tmp_path))


def test_list_file_missing(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: list file not found"):
        read_list_file(str(tmp_path / "nope.txt"), str(tmp_path))


def test_missing_and_corrupt_images_name_path_and_line(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg at all \x00\xff" * 10)
    _write_png(str(tmp_path / "good.png"))
    lst = tmp_path / "val.txt"
    lst.write_text("good.png 0\nmissing.jpg 1\nbad.jpg 2\n")
    src = read_list_file(str(lst), str(tmp_path))
    with pytest.raises(DataError) as err:
        src.load(1)
    msg = str(err.value)
    assert str(tmp_path / "missing.jpg") in msg and f"{lst}:2" in msg
    with pytest.raises(DataError) as err:
        src.load(2)
    msg = str(err.value)
    assert str(tmp_path / "bad.jpg") in msg and f"{lst}:3" in msg
    with pytest.raises(DataError, match=rf"{lst.name}:2: .*missing\.jpg"):
        read_list_file(str(lst), str(tmp_path), check_files=True)
    # the error travels through the dataset unchanged
    ds = AugmentedDataset(src, build_transform("none", False, 8, [0.5] * 3, [0.5] * 3, 3))
    with pytest.raises(DataError, match="bad.jpg"):
        ds[(2, 5)]


def test_image_folder_and_folder_kind(tmp_path):
    root = tmp_path / "train"
    _write_png(str(root / "zebra" / "1.png"))
    _write_png(str(root / "ant" / "x.jpg"))
    _write_png(str(root / "ant" / "sub" / "y.png"))
    (root / "ant" / "notes.txt").write_text("not an image")
    src = read_image_folder(str(root))
    assert src.classes == ["ant", "zebra"]
    assert src.paths == ["ant/x.jpg", "ant/sub/y.png", "zebra/1.png"]  # torchvision order
    assert src.labels.tolist() == [0, 0, 1]
    assert open_source("folder", str(tmp_path), "train", None).paths == src.paths
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(str(root / "ant" / "sub"))


def test_open_source_dispatch_errors(tmp_path):
    with pytest.raises(DataError, match="unknown kind"):
        open_source("mnist", None, "train", None)
    with pytest.raises(DataError, match="list file"):
        open_source("list", None, "train", None)
    with pytest.raises(DataError, match="data.root"):
        open_source("cifar10", None, "train", None)


def test_index_list_roundtrip_and_mismatch(tmp_path):
    src = ArraySource(np.zeros((6, 2, 2), np.uint8), [0, 1, 2, 0, 1, 2], 3, "toy")
    lst = tmp_path / "lt.txt"
    lst.write_text("# header\n3 0\n5 2\n")
    sub = read_index_list(str(lst), src)
    assert sub.indices.tolist() == [3, 5] and sub.labels.tolist() == [0, 2]
    lst.write_text("3 1\n")
    with pytest.raises(DataError, match=r"lt\.txt:1: label 1 does not match toy\[3\]"):
        read_index_list(str(lst), src)


# ----------------------------------------------------------------------------- transforms

def test_transforms_on_tensor_and_pil():
    mean, std = DEFAULT_STATS["cifar10"]
    img_t = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    img_p = Image.fromarray(img_t.permute(1, 2, 0).numpy())
    for kind in ("small", "imagenet", "none"):
        for train in (True, False):
            tf = build_transform(kind, train, 32, mean, std, 3)
            for img in (img_t, img_p):
                out = tf(img)
                assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    ev = build_transform("none", False, 32, mean, std, 3)(img_t)
    expect = (img_t.float() / 255 - torch.tensor(mean)[:, None, None]) / \
        torch.tensor(std)[:, None, None]
    assert torch.allclose(ev, expect, atol=1e-5)
    big = Image.new("RGB", (300, 200))
    assert build_transform("imagenet", False, 224, *DEFAULT_STATS["imagenet"], 3)(big).shape \
        == (3, 224, 224)
    # channel adaptation: gray -> 3 channels and RGB -> 1 channel
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert build_transform("small", True, 28, mean, std, 3)(gray).shape == (3, 28, 28)
    assert build_transform("none", False, 28, [0.5], [0.5], 1)(img_p).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="in_channels"):
        build_transform("small", True, 32, [0.5], [0.5], 3)


def test_augmented_dataset_seeded_and_rng_untouched():
    rng = np.random.RandomState(0)
    src = ArraySource(rng.randint(0, 256, (10, 32, 32, 3)).astype(np.uint8),
                      np.arange(10) % 2, 2, "toy")
    ds = AugmentedDataset(src, build_transform("imagenet", True, 24, *DEFAULT_STATS["cifar10"],
                                               3))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, ya = ds[(4, 99)]
    b, yb = ds[(4, 99)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and ya.dtype == torch.int64 and int(ya) == 0
    outs = [ds[(4, s)][0] for s in range(1, 6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    x, y = ds[np.int64(3)]
    assert x.shape == (3, 24, 24) and int(y) == 1 and type(x) is torch.Tensor
    assert len(ds) == 10


def test_augmented_dataset_seeds_the_cpu_generator_only(monkeypatch):
    """A seeded sample sets the CPU generator, not torch.manual_seed (which also queues CUDA's
    lazy seeding with a stack trace, ~1 ms a sample), and draws what manual_seed drew."""
    rng = np.random.RandomState(0)
    src = ArraySource(rng.randint(0, 256, (4, 32, 32, 3)).astype(np.uint8), np.arange(4) % 2, 2,
                      "toy")
    tf = build_transform("imagenet", True, 24, *DEFAULT_STATS["cifar10"], 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(77)
        want = tf(torch.from_numpy(src.images[2]).permute(2, 0, 1).contiguous())

    def refuse(seed):
        raise AssertionError("torch.manual_seed called per sample")
    monkeypatch.setattr(torch, "manual_seed", refuse)
    got, _ = AugmentedDataset(src, tf)[(2, 77)]
    assert torch.equal(got, torch.as_tensor(want))


def test_loader_output_independent_of_worker_count():
    rng = np.random.RandomState(0)
    src = ArraySource(rng.randint(0, 256, (40, 16, 16, 3)).astype(np.uint8),
                      np.arange(40) % 4, 4, "toy")
    ds = AugmentedDataset(src, build_transform("small", True, 16, *DEFAULT_STATS["cifar10"], 3))
    batches = {}
    for workers in (0, 2):
        sampler = build_sampler("uniform", src.labels, batch_size=8, seed=5)
        sampler.set_epoch(1)
        loader = build_torchvision_loader(ds, sampler, 8, workers, seed=5)
        batches[workers] = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches[0]) == 5
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


# ----------------------------------------------------------------------------- the LT tool

def test_make_lt_lists_on_image_folder(tmp_path):
    root = tmp_path / "data"
    for c, n in (("a", 6), ("b", 6), ("c", 6)):
        for k in range(n):
            _write_png(str(root / "train" / c / f"{k}.png"), color=(k, 0, 0), size=(4, 4))
    out = tmp_path / "lists" / "lt.txt"
    proc = subprocess.run(
        [sys.executable, "tools/make_lt_lists.py", "--source", "folder", "--root", str(root),
         "--rho", "6", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "[6, 2, 1]" in proc.stdout
    info = json.loads((tmp_path / "lists" / "lt.counts.json").read_text())
    assert info["counts"] == [6, 2, 1] and info["total"] == 9 and info["format"] == "path_label"
    src = read_list_file(str(out), info["root"], check_files=True)
    assert class_counts(src.labels, 3) == [6, 2, 1]
    assert src.load(0).size == (4, 4)


def test_make_lt_lists_on_fake_cifar_index_list(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.RandomState(0)
    for fn in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, (20, 3072)).astype(np.uint8),
                 b"labels": list(range(10)) * 2}
        with open(d / fn, "wb") as f:
            pickle.dump(batch, f)
    out = tmp_path / "c10.txt"
    proc = subprocess.run(
        [sys.executable, "tools/make_lt_lists.py", "--source", "cifar10", "--root",
         str(tmp_path), "--rho", "10", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "c10.counts.json").read_text())
    assert info["counts"] == lt_counts(10, 10, 10) and info["format"] == "index_label"
    sub = open_source("cifar10", str(tmp_path), "train", str(out))
    assert class_counts(sub.labels, 10) == info["counts"]
    full = read_cifar(str(tmp_path), "cifar10")
    assert np.array_equal(sub.indices, lt_indices(full.labels, info["counts"]))
