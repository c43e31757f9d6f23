"""Crop-sized decoding (data_pipelines/decode.py) against the generic torchvision path.

Same seeds -> same crop geometry and flips; pixels within the stated tolerances:
- full-resolution decode (crop smaller than 2x the output): every pixel within 1 level of
  255 (bilinear rounding), on photo-like JPEGs (2 levels for a 1-channel model: luma taken
  after the resize instead of before);
- DCT-domain reduced decode (crop >= 2x the output): mean within 1.5 levels and 99% of the
  pixels within 6 levels on a smooth pattern (a misplaced box by one source pixel would move
  the pattern by up to 8 levels per pixel), so the box is mapped onto the reduced image.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from ltrainer.data_pipelines.augment import DEFAULT_STATS, augment_spec, build_transform
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.decode import CropDecodeDataset, draft_scale, eval_box, supports
from ltrainer.data_pipelines.samplers import build_sampler
from ltrainer.data_pipelines.sources import DataError, FileSource
from ltrainer.data_pipelines.torchvision_loader import build_torchvision_loader

MEAN, STD = DEFAULT_STATS["imagenet"]
CFG = {"augment": "imagenet", "stats": "imagenet", "source": "list", "image_size": 224}


def _photo(rng, w, h):
    """Photo-like content: smooth blobs + texture + noise (what JPEG decoding is costly on)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(40, 200)
            img[:, :, c] += 120 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    img += 30 * np.sin(x / rng.uniform(3, 9))[:, :, None] + rng.normal(0, 8, img.shape)
    return np.clip(img + 40, 0, 255).astype(np.uint8)


def _pattern(w, h):
    """Smooth, strongly varying pattern: alignment errors show up, DCT scaling barely does."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(2 * np.pi * x / 80)
    g = 128 + 100 * np.sin(2 * np.pi * y / 80)
    b = 128 + 100 * np.sin(2 * np.pi * (x + y) / 120)
    return np.stack([r, g, b], -1).astype(np.uint8)


def _files(tmp_path, images, quality=92):
    paths = []
    for k, arr in enumerate(images):
        p = f"im{k:03d}.JPEG"
        Image.fromarray(arr).save(tmp_path / p, quality=quality)
        paths.append(p)
    return FileSource(str(tmp_path), paths, [k % 3 for k in range(len(paths))], 3, "t")


def _pair(src, train, channels=3):
    ref = AugmentedDataset(src, build_transform("imagenet", train, 224, MEAN[:channels] if
                                                channels == 3 else [0.45], STD if channels == 3
                                                else [0.25], channels))
    cfg = dict(CFG, stats="imagenet")
    spec = augment_spec(cfg, train, 3)
    if channels == 1:
        from dataclasses import replace
        spec = replace(spec, channels=1, mean=(0.45,), std=(0.25,))
    return ref, CropDecodeDataset(ref, spec), spec


def _levels(a, b, std):
    return (a - b).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255


@pytest.fixture(params=["window", "whole file"])
def decoder(request, monkeypatch):
    """The train crops of colour JPEGs decoded by jpeg_window.c, or (without it) whole."""
    from ltrainer.data_pipelines import decode

    if request.param == "window" and decode._window() is None:
        pytest.skip("jpeg_window not built")
    if request.param == "whole file":
        monkeypatch.setattr(decode, "_WINDOW", [None])
    return request.param


@pytest.mark.parametrize("train", [True, False])
def test_full_resolution_matches_generic_path(tmp_path, train, decoder):
    rng = np.random.default_rng(0)
    shapes = [(500, 375), (375, 500), (500, 333), (320, 240)]
    src = _files(tmp_path, [_photo(rng, *shapes[k % 4]) for k in range(12)])
    ref, fast, spec = _pair(src, train)
    assert supports(ref, spec)
    keys = [(k, 7919 * k + 3) for k in range(12)] if train else list(range(12))
    a = torch.stack([ref[k][0] for k in keys])
    b, y = fast.__getitems__(keys)
    assert b.shape == a.shape and b.dtype == torch.float32
    assert y.tolist() == [int(src.labels[k if isinstance(k, int) else k[0]]) for k in keys]
    assert _levels(a, b, STD).max().item() <= 1.01


def test_reduced_decode_keeps_geometry(tmp_path):
    src = _files(tmp_path, [_pattern(2000, 1600), _pattern(1600, 2000)], quality=95)
    ref, fast, _ = _pair(src, True)
    keys = [(k % 2, 1000 + k) for k in range(16)]
    a = torch.stack([ref[k][0] for k in keys])
    b, _ = fast.__getitems__(keys)
    d = _levels(a, b, STD)
    assert d.mean().item() <= 1.5
    assert (d <= 6).float().mean().item() >= 0.99
    # the same crops with the box NOT mapped (a deliberately wrong geometry) would fail this:
    shifted = torch.roll(b, shifts=1, dims=-1)
    assert _levels(a, shifted, STD).mean().item() > 2 * d.mean().item()


def test_eval_reduced_decode(tmp_path):
    src = _files(tmp_path, [_pattern(1200, 1000)], quality=95)   # 1000 >= 2 x 256
    ref, fast, _ = _pair(src, False)
    d = _levels(ref[0][0][None], fast.__getitems__([0])[0], STD)
    assert d.mean().item() <= 1.5 and (d <= 6).float().mean().item() >= 0.99


def test_draft_scale_and_eval_box():
    assert draft_scale(447, 1000, 224) == 1          # never upsampled by the reduction
    assert draft_scale(448, 448, 224) == 2
    assert draft_scale(1800, 1800, 224) == 8
    # torchvision: Resize(256) of 500x375 -> 341x256, CenterCrop(224) at (left 58, top 16)
    left, top, right, bottom = eval_box(375, 500, 224, 256)
    sx, sy = 500 / 341, 375 / 256
    assert (left, top) == pytest.approx((58 * sx, 16 * sy))
    assert (right - left, bottom - top) == pytest.approx((224 * sx, 224 * sy))


def test_gray_model_and_bad_file(tmp_path, decoder):
    rng = np.random.default_rng(1)
    src = _files(tmp_path, [_photo(rng, 400, 300) for _ in range(3)])
    ref, fast, _ = _pair(src, False, channels=1)
    a = torch.stack([ref[k][0] for k in range(3)])
    b, _ = fast.__getitems__([0, 1, 2])
    assert b.shape == (3, 1, 224, 224)
    assert _levels(a, b, [0.25]).max().item() <= 2.01   # gray after vs before the resize
    (tmp_path / src.paths[1]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="im001.JPEG"):
        fast.__getitems__([0, 1])
    whole = (tmp_path / src.paths[2]).read_bytes()       # truncated: no silent grey fill
    (tmp_path / src.paths[2]).write_bytes(whole[:len(whole) // 2])
    _, train, _ = _pair(src, True)
    with pytest.raises(DataError, match="im002.JPEG"):
        train.__getitems__([(2, 5)])


def test_loader_uses_it_and_keeps_batches(tmp_path, decoder):
    rng = np.random.default_rng(2)
    src = _files(tmp_path, [_photo(rng, 500, 375) for _ in range(10)])
    ref, _, spec = _pair(src, True)

    def batches(spec_arg):
        sampler = build_sampler("uniform", src.labels, batch_size=4, seed=5)
        loader = build_torchvision_loader(ref, sampler, 4, 0, seed=5, spec=spec_arg)
        return list(loader)

    fast, generic = batches(spec), batches(None)
    assert [len(y) for _, y in fast] == [len(y) for _, y in generic] and len(fast) >= 2
    for (xa, ya), (xb, yb) in zip(generic, fast):
        assert torch.equal(ya, yb)
        assert _levels(xa, xb, STD).max().item() <= 1.01


def test_colour_jpeg_train_crop_needs_no_pil(tmp_path, monkeypatch):
    """A colour JPEG's train crop takes its size from the frame header and is decoded by
    OpenCV: PIL is never opened (its lazy open parsed the header in Python; the pixels against
    the generic path are the tests above'), and a gray JPEG still goes through PIL."""
    pytest.importorskip("cv2")
    import PIL.Image

    rng = np.random.default_rng(3)
    src = _files(tmp_path, [_photo(rng, 500, 375), _photo(rng, 375, 500)])
    _, fast, _ = _pair(src, True)
    keys = [(0, 11), (1, 12)]
    want = fast.__getitems__(keys)[0]
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("PIL opened"))
    got = fast.__getitems__(keys)[0]
    assert torch.equal(got, want)
    gray = tmp_path / "gray.JPEG"
    Image.fromarray(_photo(rng, 300, 260)[:, :, 0]).save(gray)
    opened = []
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    g = CropDecodeDataset(AugmentedDataset(FileSource(str(tmp_path), ["gray.JPEG"], [0], 1, "g"),
                                           build_transform("imagenet", True, 224, MEAN, STD, 3)),
                          augment_spec(CFG, True, 3))
    assert g.__getitems__([(0, 5)])[0].shape == (1, 3, 224, 224) and opened
