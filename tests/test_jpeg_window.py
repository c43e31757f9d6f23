"""data_pipelines/jpeg_window.c: a window of a JPEG decoded alone is the full decode's window.

Every chroma layout the encoders write (4:4:4, 4:2:2, 4:2:0, 4:4:0), progressive files,
restart markers and odd sizes, with windows at every edge and corner, 1-pixel ones and the
whole image, against PIL's full decode (the generic torchvision path's pixels) and OpenCV's;
and a clear error for what it does not decode.
"""
import io
import os
import zlib

import numpy as np
import pytest
from PIL import Image

HEADERS = os.path.exists("/usr/include/jpeglib.h")
try:
    from ltrainer.data_pipelines import jpeg_window
except ImportError:
    if HEADERS:    # setup_env.sh installs gcc and the headers: then it must have been built
        raise
    pytest.skip("jpeg_window not built (no libjpeg-turbo headers)", allow_module_level=True)


def _photo(rng, w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / rng.uniform(4, 30) + c) * np.cos(y / rng.uniform(4, 30))
                    for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _jpeg(arr, **kw) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _windows(rng, w, h):
    yield 0, 0, h, w                                     # the whole image
    yield 0, 0, 1, 1
    yield h - 1, w - 1, 1, 1                             # the last pixel
    yield 0, w - 37, h, 37                               # right edge
    yield h - 29, 0, 29, w                               # bottom edge
    for _ in range(12):
        ww, hh = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
        yield int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1)), hh, ww


def _decode(data, top, left, height, width):
    out = np.empty((height, width, 3), np.uint8)
    jpeg_window.decode(data, top, left, height, width, out)
    return out


CASES = {
    "4:4:4": dict(subsampling=0, quality=95),
    "4:2:2": dict(subsampling=1, quality=92),
    "4:2:0": dict(subsampling=2, quality=90),
    "4:2:0 progressive": dict(subsampling=2, quality=90, progressive=True),
    "4:4:4 progressive": dict(subsampling=0, quality=85, progressive=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("size", [(500, 375), (333, 500), (97, 61)])
def test_window_is_the_full_decodes_window(case, size):
    rng = np.random.default_rng(zlib.crc32(f"{case} {size}".encode()))
    data = _jpeg(_photo(rng, *size), **CASES[case])
    full = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
    for top, left, h, w in _windows(rng, *size):
        got = _decode(data, top, left, h, w)
        np.testing.assert_array_equal(got, full[top:top + h, left:left + w],
                                      err_msg=f"{case} {size} window {(top, left, h, w)}")


def test_opencv_layouts_and_restart_markers():
    """4:4:0 (vertical-only chroma subsampling) and restart intervals, written by OpenCV."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    arr = _photo(rng, 421, 317)
    params = [[cv2.IMWRITE_JPEG_QUALITY, 93, cv2.IMWRITE_JPEG_RST_INTERVAL, 3]]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
        params.append([cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440])
    for p in params:
        ok, enc = cv2.imencode(".jpg", arr[:, :, ::-1], p)
        assert ok
        full = cv2.imdecode(enc, cv2.IMREAD_COLOR)[:, :, ::-1]
        for top, left, h, w in _windows(rng, 421, 317):
            np.testing.assert_array_equal(_decode(enc, top, left, h, w),
                                          full[top:top + h, left:left + w], err_msg=str(p))


def test_what_it_refuses():
    rng = np.random.default_rng(3)
    data = _jpeg(_photo(rng, 120, 80))
    with pytest.raises(ValueError, match="outside the 120x80 image"):
        _decode(data, 50, 0, 40, 10)
    with pytest.raises(ValueError, match="expected 4 x 5 x 3"):
        jpeg_window.decode(data, 0, 0, 4, 5, np.empty(59, np.uint8))
    with pytest.raises(ValueError, match="JPEG: .*"):
        _decode(np.frombuffer(b"not a jpeg at all", np.uint8), 0, 0, 1, 1)
    gray = _jpeg(_photo(rng, 64, 64)[:, :, 0])
    with pytest.raises(ValueError, match="1 channels, expected 3"):
        _decode(gray, 0, 0, 8, 8)
    with pytest.raises(ValueError, match="JPEG: "):
        _decode(data[:100], 0, 0, 8, 8)    # cut inside the header: libjpeg stops


def test_corrupt_data_decodes_as_opencv_decodes_it():
    """libjpeg's warnings are not errors here, as in OpenCV (the whole-file fallback), FFCV and
    DALI: a corrupt scan ('premature end of data segment', which PIL refuses, or 'extraneous
    bytes before marker', which it accepts) gives OpenCV's pixels in every window, so whether
    a sample fails never depends on the window its seed draws. (A truncated file is
    decode.py's to refuse: tests/test_decode.py.)"""
    cv2 = pytest.importorskip("cv2")
    warned = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        data = _jpeg(_photo(rng, 160, 120), quality=90).copy()
        scan = int(np.flatnonzero((data[:-1] == 0xFF) & (data[1:] == 0xDA))[0]) + 40
        data[scan + 400:scan + 420] = rng.integers(0, 256, 20)        # garbage in the scan
        full = cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]
        try:
            Image.open(io.BytesIO(data.tobytes())).load()
        except OSError:
            warned += 1                                                 # PIL: broken stream
        for top, left, h, w in [(0, 0, 120, 160), (0, 0, 10, 10), (100, 90, 20, 70)]:
            np.testing.assert_array_equal(_decode(data, top, left, h, w),
                                          full[top:top + h, left:left + w], err_msg=str(seed))
    assert warned >= 1, "no case that PIL refuses: the test lost its point"


_FUZZ = r"""
import io, sys
import numpy as np
from PIL import Image
from ltrainer.data_pipelines import jpeg_window
rng = np.random.default_rng(int(sys.argv[1]))
files = []
for sub, prog in [(0, False), (1, False), (2, False), (2, True)]:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=90, subsampling=sub, progressive=prog)
    files.append(np.frombuffer(buf.getvalue(), np.uint8))
done = 0
for i in range(int(sys.argv[2])):
    data = files[i % 4].copy()
    for _ in range(int(rng.integers(1, 8))):
        data[rng.integers(0, len(data))] = rng.integers(0, 256)
    if rng.random() < 0.2:
        data = data[:rng.integers(1, len(data))]
    top, left = int(rng.integers(0, 100)), int(rng.integers(0, 140))
    h, w = int(rng.integers(1, 121 - top)), int(rng.integers(1, 161 - left))
    try:
        jpeg_window.decode(data, top, left, h, w, np.empty((h, w, 3), np.uint8))
    except ValueError:
        pass
    done += 1
print(done)
"""


def test_mutated_files_never_crash_the_process():
    """Random byte changes and cuts in baseline and progressive files, random windows: each
    decodes or raises ValueError; the process survives (run apart: a crash is a signal)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _FUZZ, "11", "1500"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1500"
