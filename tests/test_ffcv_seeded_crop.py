"""FFCV's random-resized-crop windows come from our per-sample seeds.

FFCV's own decoder draws from numpy's global generator inside numba threads, so no two runs
(and no resumed run) saw the same crops. ffcv_ops.SeededRandomResizedCrop draws the window
with batch_aug.rrc_params's algorithm from a seed carried in the order's keys. The images are
coordinate maps (red = 4 x column, green = 4 x row), so each output's window can be read back:
its centre from the mean level, its size from the slope.
"""
import numpy as np
import pytest
import torch

from ltrainer.data_pipelines.augment import MOCO, RRC_RATIO, RRC_SCALE, build_transform
from ltrainer.data_pipelines.batch_aug import draw_params, rrc_params, view_seeds
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.loaders import backend_status, make_train_loader
from ltrainer.data_pipelines.samplers import build_sampler
from ltrainer.data_pipelines.sources import ArraySource

pytestmark = pytest.mark.skipif(not backend_status("ffcv")[0], reason="ffcv not installed")

N, H, W, OUT = 512, 48, 64, 32
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def coordinate_images():
    img = np.empty((N, H, W, 3), np.uint8)
    img[..., 0] = 4 * np.arange(W)[None, None, :]
    img[..., 1] = 4 * np.arange(H)[None, :, None]
    img[..., 2] = np.random.default_rng(0).integers(16, 240, N)[:, None, None]
    return ArraySource(img, np.arange(N) % 4, 4, "coords")


def epoch(augment, tmp, sampler_seed=11):
    """(images in levels 0..255, the sampler's per-sample seeds) of one FFCV epoch."""
    src = coordinate_images()
    cfg = {"source": "list", "stats": "svhn", "augment": augment, "image_size": OUT,
           "workers": 1, "beton_dir": str(tmp), "on_bad_image": "fail", "loader": "ffcv"}
    ds = AugmentedDataset(src, build_transform(augment, True, OUT, MEAN, STD, 3))
    sampler = build_sampler("uniform", src.labels, batch_size=128, seed=sampler_seed)
    seeds = np.array([k[1] for k in sampler])
    loader = make_train_loader(cfg, ds, sampler, batch_size=128, seed=5, in_channels=3)
    x = torch.cat([b.detach().cpu().clone() for b, _ in loader]).double()
    return x * 255 * STD[0] + 255 * MEAN[0], seeds


def read_windows(x):
    """(left + w/2, top + h/2, w, h) per image, in source pixels, from the interior."""
    inner = slice(3, OUT - 3)
    c = torch.arange(OUT, dtype=torch.float64)[inner] - (OUT - 1) / 2
    r, g = x[:, 0, inner, inner].mean(1), x[:, 1, inner, inner].mean(2)
    slope = lambda v: ((v - v.mean(1, keepdim=True)) * c).sum(1) / (c * c).sum()  # noqa: E731
    w, h = slope(r).abs() * OUT / 4, slope(g).abs() * OUT / 4
    # the interior's mean sits at output (OUT - 1) / 2, the window's centre
    return (r.mean(1) / 4 + 0.5).numpy(), (g.mean(1) / 4 + 0.5).numpy(), w.numpy(), h.numpy()


def expected(seeds, view, scale):
    from ltrainer.data_pipelines.ffcv_ops import crop_seed_of
    wins = np.array([rrc_params(int(view_seeds([s], view)[0]), H, W, scale, RRC_RATIO)
                     for s in crop_seed_of(seeds, N)], np.float64)
    top, left, h, w = wins.T
    return left + w / 2, top + h / 2, w, h


def assert_windows(x, seeds, view, scale):
    got, want = read_windows(x), expected(seeds, view, scale)
    for name, a, b in zip(("centre x", "centre y", "width", "height"), got, want):
        # area resampling of an integer ramp, read back by least squares: well under a pixel
        # (an unseeded window is off by ~10 px on average)
        err = np.abs(a - b)
        assert np.median(err) < 0.25 and err.max() < 1.5, (name, np.median(err), err.max())


def test_numba_window_is_batch_aug_rrc_params():
    from ltrainer.data_pipelines.ffcv_ops import seeded_window
    rng = np.random.default_rng(1)
    for t in range(3000):
        s, v = int(rng.integers(0, 2 ** 50)), t % 2
        hh, ww = (int(d) for d in rng.integers(8, 1200, 2))
        scale = RRC_SCALE if t % 3 else MOCO["scale"]
        got = seeded_window(s, v, hh, ww, scale[0], scale[1], RRC_RATIO[0], RRC_RATIO[1])
        assert tuple(got) == rrc_params(int(view_seeds([s], v)[0]), hh, ww, scale, RRC_RATIO)


def test_keys_carry_index_and_seed():
    from ltrainer.data_pipelines.ffcv_ops import crop_keys, crop_seed_of, index_bits
    n = 437_513
    idx = np.array([0, 1, n - 1, 12345], np.uint64)
    seeds = np.array([2 ** 62 + 7, 5, 2 ** 40 + 3, 0], np.int64)
    keys = crop_keys(idx, seeds, n)
    bits = index_bits(n)
    assert bits == 19 and (keys < np.uint64(2 ** 63)).all()
    assert ((keys & np.uint64((1 << bits) - 1)) == idx).all()
    assert ((keys >> np.uint64(bits)).astype(np.int64) == crop_seed_of(seeds, n)).all()


def test_imagenet_windows_follow_the_seeds(tmp_path):
    x, seeds = epoch("imagenet", tmp_path)
    assert_windows(x, seeds, 0, RRC_SCALE)


def test_moco_views_follow_the_seeds(tmp_path):
    x, seeds = epoch("moco", tmp_path)
    assert x.shape[1] == 2
    for v in range(2):
        p = draw_params(view_seeds(seeds, v), 3, MOCO)
        plain = torch.from_numpy(~p["jitter"] & ~p["gray"])   # colour would move the levels
        assert plain.sum() > 50
        assert_windows(x[plain, v], seeds[plain.numpy()], v, MOCO["scale"])


def test_same_seeds_same_batches(tmp_path):
    a, _ = epoch("imagenet", tmp_path)
    b, _ = epoch("imagenet", tmp_path)
    c, _ = epoch("imagenet", tmp_path, sampler_seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
