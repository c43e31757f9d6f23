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
