"""tools/bench_loaders.py's default set is photo-like at ImageNet's sizes (issue 14 item 1)."""
import os

import pytest
from PIL import Image

from ltrainer.tools.bench_loaders import make_photo_set, parse_beton


def test_photo_set_has_imagenet_shapes_and_file_sizes(tmp_path):
    list_path = make_photo_set(str(tmp_path), n=6, classes=3)
    lines = open(list_path).read().splitlines()
    assert len(lines) == 6 and {line.rsplit(" ", 1)[1] for line in lines} == {"0", "1", "2"}
    sizes, kb = set(), []
    for line in lines:
        path = os.path.join(tmp_path, line.rsplit(" ", 1)[0])
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
        kb.append(os.path.getsize(path) / 1e3)
    assert sizes <= {(500, 375), (375, 500), (500, 333)}
    assert 60 <= sum(kb) / len(kb) <= 200          # ImageNet: ~110 KB on average


def test_beton_settings_parse_and_bad_key_is_one_line():
    assert parse_beton("mode=raw") == {"mode": "raw", "jpeg_quality": 90, "max_side": None}
    assert parse_beton("mode=jpg,quality=75,max_side=400") == {
        "mode": "jpg", "jpeg_quality": 75, "max_side": 400}
    with pytest.raises(SystemExit, match="unknown setting 'qualty'"):
        parse_beton("qualty=75")


def test_profile_dali_prints_a_row_per_variant(tmp_path, capsys):
    """tools/profile_dali.py (the README's DALI profile) on a tiny set: every variant's row,
    with CPU ms/img > 0, and its '+' rows' parts over their base rows."""
    pytest.importorskip("nvidia.dali")
    from ltrainer.tools.profile_dali import main

    assert main(["--work-dir", str(tmp_path), "--n", "16", "--batch", "8", "--rounds", "1"]) == 0
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ") and not line.startswith("| variant")]
    rows = {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in table}
    resize = ["linear + antialias (the graph's)", "triangular", "cubic", "lanczos",
              "linear, no antialias"]
    want = (["bare: full decode", "bare: ROI decode (image_slice, seeded window)"]
            + [f"+ resize, {f}" for f in resize]
            + ["+ normalise: the seeded train graph (dali_graph.graph)",
               "bare: image_random_crop + resize + normalise",
               "bare MoCo: full decode, 2 x (slice + resize)",
               "bare MoCo: full decode, 2 x resize of the window as ROI (the graph's)"]
            + [f"DaliLoader: {t}, prefetch 2" for t in ("1 thread", "3 threads", "4 threads")]
            + ["DaliLoader: 2 threads, prefetch 2 (defaults)"]
            + [f"DaliLoader: 2 threads, prefetch {p}" for p in (1, 3, 4)])
    assert sorted(rows) == sorted(want)
    for name, (ms, median, part, x, rate) in rows.items():
        assert float(ms) > 0 and float(median) >= float(ms) and float(rate) > 0, name
        assert (part == "-") == (not name.startswith("+")), name
    roi = float(rows["bare: ROI decode (image_slice, seeded window)"][0])
    cubic = rows["+ resize, cubic"]
    assert abs(float(cubic[0]) - roi - float(cubic[2])) < 0.015
    assert rows["+ normalise: the seeded train graph (dali_graph.graph)"][3] == "1.00"


def test_ablation_rows_and_the_decoder_named(tmp_path, capsys):
    """--ablate: the torchvision row, and one row each without the window decoder and without
    reused batch memory; the header names the decoder the torchvision rows' crops got."""
    from ltrainer.data_pipelines.decode import decoder_name
    from ltrainer.tools.bench_loaders import main

    assert main(["--work-dir", str(tmp_path), "--sets", "photo", "--n", "16", "--batch", "8",
                 "--rounds", "1", "--threads", "2", "--backends", "torchvision",
                 "--baseline-rev", "", "--ablate"]) == 0
    out = capsys.readouterr().out
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
             if line.startswith("| ") and not line.startswith("| backend")]
    rows = [cells[0] for cells in table]
    assert all(float(cells[-1]) > 0 for cells in table), table    # CPU ms/img
    assert rows[:4] == ["torchvision", "torchvision, whole-file decode",
                        "torchvision, fresh batch memory", "decode-only PIL"]
    assert f"torchvision's train crops: {decoder_name()}" in out
