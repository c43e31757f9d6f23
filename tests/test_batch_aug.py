"""The shared batched MoCo colour/blur stage and normalisation (data_pipelines/batch_aug.py):
torchvision's semantics op by op, the declared probabilities, seeded draws."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from ltrainer.data_pipelines import batch_aug as B
from ltrainer.data_pipelines.augment import MOCO, AugmentSpec

N = 20000


def _images(n=6, c=3, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


@pytest.mark.parametrize("op", range(4))
def test_each_jitter_part_is_torchvisions(op):
    x = _images()
    p = B.draw_params(np.arange(len(x)) + 7, 3, MOCO)
    rows = np.arange(len(x))
    got = B._jitter_op(op, x, p, rows)
    ref_fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
    key = ("brightness", "contrast", "saturation", "hue")[op]
    want = torch.stack([ref_fn(x[i], float(p[key][i])) for i in rows])
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


def test_contrast_on_one_channel_and_grayscale_and_blur_are_torchvisions():
    x = _images(c=1)
    p = B.draw_params(np.arange(len(x)), 1, MOCO)
    want = torch.stack([TF.adjust_contrast(x[i], float(p["contrast"][i])) for i in range(len(x))])
    assert torch.allclose(B._jitter_op(1, x, p, np.arange(len(x))), want, atol=2e-5)
    rgb = _images()
    assert torch.allclose(B._gray(rgb), TF.rgb_to_grayscale(rgb), atol=1e-6)
    sig = np.array([0.1, 0.5, 1.0, 1.7, 2.0, 0.3])
    got = B.gaussian_blur(rgb, sig, 5)
    want = torch.stack([TF.gaussian_blur(rgb[i], [5, 5], [float(s), float(s)])
                        for i, s in enumerate(sig)])
    assert torch.allclose(got, want, atol=1e-5)


def _binomial_ok(rate, p, n):
    return abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n)   # 4 standard errors


def test_draws_follow_the_declared_probabilities_and_ranges():
    p = B.draw_params(np.arange(N) * 7919 + 3, 3, MOCO)
    for key, prob in (("jitter", MOCO["jitter_p"]), ("gray", MOCO["gray_p"]),
                      ("blur", MOCO["blur_p"]), ("flip", 0.5)):
        assert _binomial_ok(p[key].mean(), prob, N), (key, p[key].mean())
    b, c, s, h = MOCO["jitter"]
    for key, (lo, hi) in (("brightness", (1 - b, 1 + b)), ("contrast", (1 - c, 1 + c)),
                          ("saturation", (1 - s, 1 + s)), ("hue", (-h, h)),
                          ("sigma", MOCO["blur_sigma"])):
        v = p[key]
        assert lo <= v.min() and v.max() <= hi, key
        sd = (hi - lo) / math.sqrt(12)                        # uniform's standard deviation
        assert abs(v.mean() - (lo + hi) / 2) <= 4 * sd / math.sqrt(N), key
    perms = {tuple(r) for r in p["order"][:2000].tolist()}
    assert len(perms) == 24                                   # every order of the four parts
    counts = np.bincount(p["order"][:, 0], minlength=4) / N   # each part first 1/4 of the time
    assert all(_binomial_ok(q, 0.25, N) for q in counts), counts
    # the flags are independent of each other (a shared draw would correlate them)
    both = (p["gray"] & p["blur"]).mean()
    assert _binomial_ok(both, MOCO["gray_p"] * MOCO["blur_p"], N)


def test_the_seed_alone_decides_the_pixels():
    spec = AugmentSpec("moco", True, 20, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3)
    aug = B.BatchAugment(spec, flip=True)
    x = (torch.rand(8, 2, 3, 20, 20) * 255).to(torch.uint8)
    seeds = np.arange(8) * 1000 + 1
    a, b = aug(x, seeds), aug(x, seeds)
    assert a.shape == (8, 2, 3, 20, 20) and a.dtype == torch.float32 and torch.equal(a, b)
    c = aug(x, seeds + 1)
    assert not torch.equal(a, c)
    # a sample's pixels do not depend on its batch neighbours
    assert torch.equal(aug(x[3:4], seeds[3:4]), a[3:4])
    # the two views draw differently
    assert not np.array_equal(B.view_seeds(seeds, 0), B.view_seeds(seeds, 1))
    with pytest.raises(ValueError, match="seeds"):
        aug(x[:, 0], None)


def test_normalisation_maths_and_channel_matching():
    spec = AugmentSpec("none", False, 4, (0.5,), (0.25,), 1)
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    got = B.BatchAugment(spec)(x.contiguous())
    gray = 0.2989 * 0 + 0.587 * 0.2 + 0.114 * 1.0
    assert got.shape == (1, 1, 4, 4)
    assert torch.allclose(got, torch.full_like(got, (gray - 0.5) / 0.25), atol=1e-5)
    spec3 = AugmentSpec("none", False, 4, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), 3)
    one = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    got = B.BatchAugment(spec3)(one)
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([1.8, 1.6, 1.4]), atol=1e-6)


def test_batched_small_crop_is_the_torchvision_backends_pixel_for_pixel():
    """FFCV and DALI hand the "small" crop to this stage: same seeds, same pixels as the
    torchvision backend's SmallImageTransform."""
    from ltrainer.data_pipelines.augment import SmallImageTransform

    mean, std = (0.3,), (0.4,)
    ref = SmallImageTransform(True, 28, mean, std, 1)
    x = (torch.rand(16, 1, 28, 28) * 255).to(torch.uint8)
    seeds = np.arange(16) * 977 + 5
    want = torch.stack([ref(x[i], int(s)) for i, s in enumerate(seeds)])
    spec = AugmentSpec("small", True, 28, mean, std, 1)
    got = B.BatchAugment(spec, crop=True)(x, seeds)
    assert torch.allclose(got, want, atol=1e-5)
    rgb = B.BatchAugment(spec, crop=True, gray_rgb=True)(x.expand(-1, 3, -1, -1), seeds)
    assert torch.allclose(rgb, want, atol=1e-5)           # gray stored as RGB: channel 0


def test_seeded_random_resized_crop_window_follows_the_recipe():
    from ltrainer.data_pipelines.augment import RRC_RATIO, RRC_SCALE

    wins = np.array([B.rrc_params(s, 60, 80, RRC_SCALE, RRC_RATIO) for s in range(4000)])
    i, j, h, w = wins.T
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= 60).all() and (j + w <= 80).all()
    area = h * w / (60 * 80)
    assert RRC_SCALE[0] - 0.01 <= area.min() and area.max() <= RRC_SCALE[1]
    ratio = w / h
    assert (ratio > RRC_RATIO[0] * 0.9).all() and (ratio < RRC_RATIO[1] * 1.1).all()
    assert B.rrc_params(7, 60, 80, RRC_SCALE, RRC_RATIO) == B.rrc_params(7, 60, 80, RRC_SCALE,
                                                                          RRC_RATIO)


def test_batched_windows_are_rrc_params_windows():
    """rrc_windows (the DALI feeder's, one stream draw per batch) gives rrc_params's windows,
    also for tiny, extreme-aspect images that fall back to the centre crop."""
    from ltrainer.data_pipelines.augment import RRC_RATIO, RRC_SCALE

    g = np.random.default_rng(0)
    seeds = g.integers(0, 2 ** 62, 3000)
    sizes = [tuple(v) for v in g.integers(1, 600, (3000, 2)).tolist()]
    sizes[:3] = [(1, 1), (3, 500), (500, 3)]
    for scale in (RRC_SCALE, MOCO["scale"]):
        want = [B.rrc_params(int(s), h, w, scale, RRC_RATIO) for s, (h, w) in zip(seeds, sizes)]
        got = B.rrc_windows(seeds, sizes, scale, RRC_RATIO)
        assert got.dtype == np.int64 and got.tolist() == [list(v) for v in want]
    assert B.rrc_windows(np.zeros(0, np.int64), [], RRC_SCALE, RRC_RATIO).shape == (0, 4)


def test_crop_window_and_colour_draws_of_a_view_are_independent():
    """They share a view's seed; a shared draw made big crops go with no jitter."""
    from ltrainer.data_pipelines.augment import RRC_RATIO

    seeds = np.arange(N)
    area = np.array([(lambda w: w[2] * w[3])(B.rrc_params(int(s), 48, 64, MOCO["scale"],
                                                           RRC_RATIO)) for s in seeds])
    jitter = B.draw_params(seeds, 3, MOCO)["jitter"]
    a, b = area[jitter], area[~jitter]
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= 4 * se


def test_ffcvs_in_place_flip_is_the_shared_flip():
    """FFCV's CPU path flips its normalised batch with a numba kernel (torch's
    gather-flip-scatter cost ~10x more): the same samples, the same pixels."""
    from ltrainer.data_pipelines.loaders import backend_status

    if not backend_status("ffcv")[0]:
        pytest.skip("ffcv not installed")
    from ltrainer.data_pipelines.ffcv_ops import flip_in_place

    x = torch.randn(16, 3, 8, 9)
    seeds = np.arange(16) * 31
    want = B.flip_rows(x.clone(), seeds)
    rows = np.nonzero(B.flip_mask(seeds))[0].astype(np.int64)
    got = x.clone()
    flip_in_place(got.numpy(), rows)
    assert 0 < len(rows) < 16 and torch.equal(got, want)
