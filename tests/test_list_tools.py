"""The data-side tools for the real workload: tools/check_lists.py (data_pipelines/list_check),
tools/make_synthetic_lt.py and tools/prepare_inat.py, on the real ImageNet-LT / iNaturalist
2018 split files in ../shared/lists (read from there, never copied into the project)."""
import gzip
import json
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from ltrainer.data_pipelines.list_check import check_data_section, check_split_lists
from tests.conftest import ROOT, run_cli
from ltrainer.tools import check_lists

LISTS = os.path.normpath(os.path.join(ROOT, "..", "shared", "lists"))
needs_lists = pytest.mark.skipif(not os.path.isfile(os.path.join(LISTS, "ImageNet_LT_val.txt.gz")),
                                 reason="the real split files of ../shared/lists are not here")
COUNTS = os.path.join(LISTS, "ImageNet_LT_train_counts.json")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real ImageNet-LT val/test lists, gunzipped into a temporary folder."""
    d = tmp_path_factory.mktemp("real")
    out = {}
    for split in ("val", "test"):
        out[split] = str(d / f"ImageNet_LT_{split}.txt")
        with gzip.open(os.path.join(LISTS, f"ImageNet_LT_{split}.txt.gz"), "rb") as f:
            data = f.read()
        with open(out[split], "wb") as f:
            f.write(data)
    return out


@needs_lists
def test_real_imagenet_lt_lists_recognised_with_published_counts(real):
    report = check_split_lists(real, root=None, num_classes=1000)
    assert report.ok, report.summary()
    by = {s.split: s for s in report.splits}
    for split, n, per in (("val", 20_000, 20), ("test", 50_000, 50)):
        s = by[split]
        assert s.identity == f"this is the official ImageNet-LT {split} list"
        assert s.images == n and len(s.counts) == 1000
        assert s.counts.min() == s.counts.max() == per
    assert "20,000 images, 1,000 of 1,000 classes, per class min 20 / median 20 / max 20" \
        in report.summary()


@needs_lists
def test_check_lists_reports_every_problem_at_once(real, tmp_path, capsys):
    """Finding 3: a truncated list, a label beyond num_classes, a malformed line, a duplicate,
    a class with no training image and a root holding none of the images, in one run."""
    wnid = {int(y): p.split("/")[1] for p, y in
            (line.rsplit(None, 1) for line in open(real["val"]).read().splitlines())}
    train = [f"train/{wnid[c]}/{wnid[c]}_900001.JPEG {c}" for c in range(1000) if c != 5]
    train[10:10] = [train[3], "train/n01440764/n01440764_900002.JPEG 1000",
                    "train/n01440764/n01440764_900003.JPEG"]
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    full = open(real["test"], "rb").read()
    (tmp_path / "test.txt").write_bytes(full[:len(full) // 2 + 7])   # cut inside a line
    empty_root = tmp_path / "images"
    empty_root.mkdir()
    status = check_lists.main(["--config", "configs/imagenet_lt_moco_crt.yaml",
                               f"data.root={empty_root}",
                               f"data.train_list={tmp_path / 'train.txt'}",
                               f"data.val_list={real['val']}",
                               f"data.test_list={tmp_path / 'test.txt'}"])
    out = capsys.readouterr().out
    assert status == 2, out
    assert "this is the official ImageNet-LT val list" in out
    assert re.search(r"test\.txt: the last line has no newline; the file may be truncated", out)
    assert re.search(r"not the official ImageNet-LT test list \(ImageNet_LT_test.txt\): "
                     r"25,\d\d\d lines \(official 50,000\)", out)
    assert re.search(rf"{tmp_path / 'train.txt'}:12: label 1000", out)       # file:line
    assert "labels out of range (expected 0 <= label < num_classes = 1000)" in out
    assert re.search(rf"train\.txt:13: malformed line 'train/n01440764/n01440764_900003\.JPEG'",
                     out)
    assert re.search(r"1 duplicate lines: train/\S+_900001\.JPEG at lines 4 and 11", out)
    assert re.search(r"train list \S+: 1 of 1,000 classes have no image: 5; training needs", out)
    assert "set data.classes" in out
    assert re.search(r"test list \S+: \d+ of 1,000 classes have no image", out)
    assert re.search(rf"image root '{empty_root}' holds none of the 1,000 sampled images", out)
    # the same report from the library, for --dry-run
    report = check_split_lists({"train": str(tmp_path / "train.txt")}, str(empty_root), 1000)
    assert len(report.problems) == 5 and not report.ok


def _read(path):
    return [(p, int(y)) for p, y in (line.rsplit(None, 1) for line in
                                     open(path).read().splitlines())]


@needs_lists
def test_make_synthetic_lt_tiny_from_imagenet_lt_counts(tmp_path):
    counts = json.load(open(COUNTS))
    val_gz = os.path.join(LISTS, "ImageNet_LT_val.txt.gz")
    # the lists alone, at full size: the real per-class counts, paths as in the real lists
    run_cli("tools/make_synthetic_lt.py", "--out", str(tmp_path / "lists"), "--profile",
            "imagenet_lt", "--counts", COUNTS, "--list", val_gz, "--lists-only")
    train = _read(tmp_path / "lists" / "ImageNet_LT_train.txt")
    val = _read(tmp_path / "lists" / "ImageNet_LT_val.txt")
    assert np.bincount([y for _, y in train], minlength=1000).tolist() == counts
    assert len(train) == 115_846
    wnid = {y: p.split("/")[1] for p, y in val}
    assert all(re.fullmatch(rf"train/{wnid[y]}/{wnid[y]}_\d+\.JPEG", p) for p, y in train)
    assert not {p for p, _ in train} & {p for p, _ in val}      # val is drawn from train/
    assert (tmp_path / "lists" / "ImageNet_LT_val.txt").read_bytes() == \
        gzip.open(val_gz).read()                                # the real list, byte for byte
    # images, one per class and split: written, resumable, decodable
    out = tmp_path / "set"
    args = ("tools/make_synthetic_lt.py", "--out", str(out), "--profile", "imagenet_lt",
            "--counts", COUNTS, "--list", val_gz, "--max-per-class", "1", "--jobs", "2")
    first = run_cli(*args).stdout
    assert "3,000 images written" in first
    lists = {s: str(out / f"ImageNet_LT_{s}.txt") for s in ("train", "val", "test")}
    report = check_split_lists(lists, str(out / "images"), 1000, decode=20)
    assert report.ok, report.summary()
    some = out / "images" / _read(lists["train"])[7][0]
    with Image.open(some) as img:
        assert img.format == "JPEG" and 16 <= min(img.size) and max(img.size) <= 32
    stamp = some.stat().st_mtime_ns
    again = run_cli(*args).stdout
    assert "0 images written" in again and "3,000 already complete" in again
    assert "(unchanged)" in again and some.stat().st_mtime_ns == stamp
    # an interrupted run: one image missing, one cut short
    os.remove(some)
    cut = out / "images" / _read(lists["val"])[3][0]
    cut.write_bytes(cut.read_bytes()[:100])
    assert "2 images written" in run_cli(*args).stdout
    assert check_split_lists(lists, str(out / "images"), 1000, sample=3000, decode=0).ok
    # data.check_files: true stats every listed image, not a sample
    data = {"source": "list", "root": str(out / "images"), "num_classes": 1000,
            "check_files": True, **{f"{s}_list": p for s, p in lists.items()}}
    os.remove(out / "images" / _read(lists["test"])[-1][0])
    report = check_data_section(data, sample=10)
    assert "checked 3,000 of 3,000 listed images" in report.summary()
    assert re.search(r"1 of 3,000 listed images missing: \S+ \(listed at \S+ImageNet_LT_test"
                     r"\.txt:1000\)", report.problems[0]), report.problems


def test_inat_shaped_list_is_checked_in_seconds(tmp_path):
    """The iNat-2018 profile has the published totals, and 437,513 lines check in seconds."""
    run_cli("tools/make_synthetic_lt.py", "--out", str(tmp_path), "--profile", "inat2018",
            "--lists-only")
    lists = {"train": str(tmp_path / "iNaturalist18_train.txt"),
             "val": str(tmp_path / "iNaturalist18_val.txt")}
    start = time.perf_counter()
    report = check_split_lists(lists, None, 8142)
    took = time.perf_counter() - start
    assert report.ok, report.summary()
    train, val = report.splits
    assert (train.images, len(train.counts), train.counts.max(), train.counts.min()) == \
        (437_513, 8142, 1000, 2)
    assert val.images == 24_426 and val.counts.min() == val.counts.max() == 3
    assert re.fullmatch(r"train_val2018/[A-Z][a-z]+/\d+/[0-9a-f]{32}\.jpg \d+",
                        open(lists["train"]).readline().strip())
    assert took < 20, f"checking 437,513 lines took {took:.1f} s"


def test_prepare_inat_from_a_tiny_json_pair(tmp_path):
    def coco(images, labels, n_categories=3):
        return {"images": [{"id": i, "file_name": f, "width": 800, "height": 600}
                           for i, f in images],
                "annotations": [{"id": 100 + i, "image_id": i, "category_id": c}
                                for i, c in labels],
                "categories": [{"id": c, "name": f"sp{c}", "supercategory": "Plantae"}
                               for c in range(n_categories)]}
    train = coco([(7, "train_val2018/Plantae/2/aa.jpg"), (3, "train_val2018/Aves/0/bb.jpg"),
                  (9, "train_val2018/Aves/1/cc.jpg")], [(3, 0), (7, 2), (9, 1)])
    val = coco([(1, "train_val2018/Aves/1/dd.jpg"), (2, "train_val2018/Plantae/2/ee.jpg")],
               [(2, 2), (1, 1)])
    (tmp_path / "train2018.json").write_text(json.dumps(train))
    (tmp_path / "val2018.json").write_text(json.dumps(val))
    args = ("tools/prepare_inat.py", "--train-json", str(tmp_path / "train2018.json"),
            "--val-json", str(tmp_path / "val2018.json"), "--out", str(tmp_path / "lists"))
    proc = run_cli(*args)
    assert (tmp_path / "lists" / "iNaturalist18_train.txt").read_text() == (
        "train_val2018/Plantae/2/aa.jpg 2\ntrain_val2018/Aves/0/bb.jpg 0\n"
        "train_val2018/Aves/1/cc.jpg 1\n")
    assert (tmp_path / "lists" / "iNaturalist18_val.txt").read_text() == (
        "train_val2018/Aves/1/dd.jpg 1\ntrain_val2018/Plantae/2/ee.jpg 2\n")
    assert "not byte-identical to the official iNaturalist18_train.txt" in proc.stdout
    # an image without its annotation is named, and nothing is written
    val["annotations"].pop()
    (tmp_path / "val2018.json").write_text(json.dumps(val))
    os.remove(tmp_path / "lists" / "iNaturalist18_val.txt")
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert re.search(r"val2018\.json: image id 1 \(train_val2018/Aves/1/dd\.jpg\) has 0 "
                     r"categories", proc.stderr)
    assert not (tmp_path / "lists" / "iNaturalist18_val.txt").exists()


def test_make_synthetic_lt_imagenet_like_images(tmp_path):
    """--size imagenet: photo-like JPEGs at ImageNet's shapes and ~110 KB file sizes."""
    lst = tmp_path / "some.txt"
    lst.write_text("".join(f"train/n0144{c}/n0144{c}_{k}.JPEG {c}\n"
                           for c in range(3) for k in range(3)))
    proc = run_cli("tools/make_synthetic_lt.py", "--out", str(tmp_path / "out"), "--list",
                   str(lst), "--size", "imagenet", "--jobs", "1")
    assert "9 images written" in proc.stdout
    sizes = []
    for line in lst.read_text().splitlines():
        path = tmp_path / "out" / "images" / line.split()[0]
        with Image.open(path) as img:
            assert img.size in ((500, 375), (375, 500), (500, 333)) and img.mode == "RGB"
            assert np.asarray(img).std() > 20                      # not a flat image
        sizes.append(path.stat().st_size)
    assert 60e3 < np.mean(sizes) < 160e3, sizes
