"""Every installed backend implements each augmentation recipe with the same statistics.

The images are coordinate maps (red = 4 x column, green = 4 x row, blue = a per-image level),
so the crop window, its scale and aspect and the flip can be read back from each output: in
the interior of a crop, any resampling filter that is symmetric and normalised (bilinear,
antialiased bilinear, area, triangle) keeps a linear ramp linear, so a least-squares slope of
red across the columns gives the window's width and its sign the flip. Held to: the recipe's
own distribution (drawn here with torchvision's RandomResizedCrop algorithm, many samples),
with tolerances of 4 standard errors of the difference (false alarm ~6e-5 per comparison),
the standard errors measured from the samples themselves. The "small" recipe is drawn from
the per-sample seeds in every backend: it must match the torchvision backend pixel for pixel.
"""
import math

import numpy as np
import pytest
import torch

from ltrainer.data_pipelines.augment import MOCO, RRC_RATIO, RRC_SCALE, build_transform
from ltrainer.data_pipelines.batch_aug import draw_params, rrc_params, view_seeds
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.loaders import backend_status, make_eval_loader, make_train_loader
from ltrainer.data_pipelines.samplers import SequentialSampler, build_sampler
from ltrainer.data_pipelines.sources import ArraySource

BACKENDS = ("torchvision", "dali", "ffcv")
N, H, W, OUT = 2048, 48, 64, 16
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)    # data.stats: svhn
Z = 4.0
# Largest error of a least-squares slope over the 12 interior columns (2..13 of 16) when each
# level is rounded to an integer (+-0.5): 0.5 * sum|c - mean| / sum (c - mean)^2 levels per
# column, i.e. this many source pixels of window width (4 levels per source pixel).
C = np.arange(2, OUT - 2) - (OUT - 1) / 2
SLOPE_ERR_PX = 0.5 * np.abs(C).sum() / (C * C).sum() * OUT / 4


def coordinate_images(n=N, h=H, w=W, seed=0):
    g = np.random.default_rng(seed)
    img = np.empty((n, h, w, 3), np.uint8)
    img[..., 0] = 4 * np.arange(w)[None, None, :]
    img[..., 1] = 4 * np.arange(h)[None, :, None]
    img[..., 2] = g.integers(16, 240, n)[:, None, None]
    return ArraySource(img, np.arange(n) % 4, 4, "coords")


@pytest.fixture(scope="module")
def coords():
    return coordinate_images()


def run(backend, source, augment, train, size, tmp):
    """(images in levels 0..255, per-sample seeds of the sampler, item indices) of one epoch."""
    ok, why = backend_status(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")
    cfg = {"source": "list", "stats": "svhn", "augment": augment, "image_size": size,
           "workers": 1 if backend == "ffcv" else 0, "dali_threads": 1, "dali_device": "cpu",
           "beton_dir": str(tmp), "on_bad_image": "fail", "loader": backend}
    ds = AugmentedDataset(source, build_transform(augment, train, size, MEAN, STD, 3))
    sampler = (build_sampler("uniform", source.labels, batch_size=256, seed=11) if train
               else SequentialSampler(len(source)))
    keys = list(sampler)
    make = make_train_loader if train else make_eval_loader
    loader = make(cfg, ds, sampler, batch_size=256, seed=5, in_channels=3)
    x = torch.cat([b.detach().cpu().clone() for b, _ in loader]).double()
    x = x * 255 * STD[0] + 255 * MEAN[0]
    seeds = np.array([k[1] for k in keys]) if train else None
    items = np.array([k[0] if isinstance(k, tuple) else k for k in keys])
    return x, seeds, items


def windows(x):
    """Per output image: (width, height) of its source window in source pixels, flip flag,
    and the window's centre, from least-squares slopes over the interior pixels."""
    size = x.shape[-1]
    inner = slice(2, size - 2)
    r = x[:, 0, inner, inner].mean(1)             # [n, cols]: mean over rows
    g = x[:, 1, inner, inner].mean(2)             # [n, rows]: mean over columns
    c = torch.as_tensor(C)
    slope_r = ((r - r.mean(1, keepdim=True)) * c).sum(1) / (c * c).sum()
    slope_g = ((g - g.mean(1, keepdim=True)) * c).sum(1) / (c * c).sum()
    width = slope_r.abs() * size / 4              # 4 red levels per source column
    height = slope_g.abs() * size / 4
    centre = ((r.mean(1) / 4 + 0.5).numpy(), (g.mean(1) / 4 + 0.5).numpy())
    return width.numpy(), height.numpy(), (slope_r < 0).numpy(), centre


def close(name, a, b):
    """|mean(a) - mean(b)| within Z standard errors of the difference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) <= Z * se, (name, a.mean(), b.mean(), se)


def rate_ok(name, flags, p):
    f = np.asarray(flags, np.float64)
    assert abs(f.mean() - p) <= Z * math.sqrt(p * (1 - p) / len(f)), (name, f.mean())


def reference_windows(scale, n=20000):
    """The recipe's window distribution: torchvision's algorithm (batch_aug.rrc_params)."""
    wins = np.array([rrc_params(s * 7 + 1, H, W, scale, RRC_RATIO) for s in range(n)])
    return wins[:, 3].astype(float), wins[:, 2].astype(float)


@pytest.mark.parametrize("augment,scale", [("imagenet", RRC_SCALE), ("moco", MOCO["scale"])])
def test_random_resized_crop_scale_aspect_and_flip(coords, augment, scale, tmp_path):
    """Window area and log aspect match the recipe's distribution, flips p = 0.5. For MoCo,
    the views whose seeds drew no colour jitter and no grayscale (blur keeps ramps linear);
    and the shared colour stage: per-image channel means and stds of both views distribute
    as the torchvision backend's."""
    ref_w, ref_h = reference_windows(scale)
    colour = {}
    for backend in BACKENDS:
        if not backend_status(backend)[0]:
            continue
        x, seeds, items = run(backend, coords, augment, True, OUT, tmp_path)
        if augment == "moco":
            assert x.shape[1] == 2
            colour[backend] = (x.mean((3, 4)).reshape(-1, 3).numpy(),
                               x.std((3, 4)).reshape(-1, 3).numpy())
            p = draw_params(view_seeds(seeds, 0), 3, MOCO)
            plain = ~p["jitter"] & ~p["gray"]
            x = x[torch.from_numpy(plain), 0]
        w, h, flip, _ = windows(x)
        close(f"{backend} {augment} area", w * h / (H * W), ref_w * ref_h / (H * W))
        close(f"{backend} {augment} log aspect", np.log(w / h), np.log(ref_w / ref_h))
        rate_ok(f"{backend} {augment} flips", flip, 0.5)
    if colour:
        ref_m, ref_s = colour.pop("torchvision")
        for backend, (m, s) in colour.items():
            for ch in range(3):
                close(f"{backend} mean ch{ch}", m[:, ch], ref_m[:, ch])
                close(f"{backend} std ch{ch}", s[:, ch], ref_s[:, ch])


def test_small_recipe_is_identical_in_every_backend(tmp_path):
    """Pad-4 crop + flip from the per-sample seeds: the same pixels everywhere, and offsets
    and flips that follow the recipe (offsets uniform on -4..4, flips p = 0.5)."""
    src = coordinate_images(n=N, h=24, w=24, seed=1)
    out = {b: run(b, src, "small", True, 24, tmp_path)[0] for b in BACKENDS
           if backend_status(b)[0]}
    ref = out.pop("torchvision")
    for backend, x in out.items():       # float32 normalisation: ~1e-5 of a level apart
        assert torch.allclose(x, ref, atol=1e-3), (backend, (x - ref).abs().max())
    # columns 11..13 of the crop always lie inside the image (offset <= 4)
    red = ref[:, 0, 12, 11:14] / 4
    flip = (red[:, 2] < red[:, 0]).numpy()
    off = (red[:, 1] - torch.where(torch.from_numpy(flip), 11.0, 12.0)).round().numpy()
    rate_ok("small flips", flip, 0.5)
    var, mu4 = 20 / 3, 708 / 9               # discrete uniform on -4..4: variance, 4th moment
    assert set(np.unique(off)) <= set(range(-4, 5))
    assert abs(off.mean()) <= Z * math.sqrt(var / len(off))
    assert abs(off.var() - var) <= Z * math.sqrt((mu4 - var ** 2) / len(off))


def test_eval_window_and_channel_statistics_agree(coords, tmp_path):
    """Resize the shorter side to size x 256/224, center crop: a centred window of the
    shorter side x size / resize (each backend rounds it to whole pixels: 1 px), and the blue
    channel, constant per image, comes through at its level (+-0.5 for uint8 rounding)."""
    resize = int(OUT * 256 / 224)
    want = min(H, W) * OUT / resize
    for backend in BACKENDS:
        if not backend_status(backend)[0]:
            continue
        x, _, items = run(backend, coords, "imagenet", False, OUT, tmp_path)
        w, h, flip, (cx, cy) = windows(x)
        assert not flip.any(), backend
        tol = 1.0 + SLOPE_ERR_PX
        assert np.abs(w - want).max() <= tol and np.abs(h - want).max() <= tol, \
            (backend, w.min(), w.max(), want)
        assert np.abs(cx - W / 2).max() <= 0.5 + 0.125 + 1e-6, backend
        assert np.abs(cy - H / 2).max() <= 0.5 + 0.125 + 1e-6, backend
        level = torch.from_numpy(coords.images[items, 0, 0, 2].astype(np.float64))
        assert (x[:, 2] - level.view(-1, 1, 1)).abs().max() <= 0.5 + 1e-3, backend


@pytest.fixture(scope="module")
def coord_jpegs(tmp_path_factory):
    """512 coordinate maps as lossless-chroma JPEGs (quality 100, 4:4:4), every fourth one
    tagged with an EXIF rotation, which every backend ignores (PIL does)."""
    from PIL import Image

    from ltrainer.data_pipelines.sources import read_list_file

    d = tmp_path_factory.mktemp("coord_jpegs")
    src = coordinate_images(n=512, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90 CW to display"
    lines = []
    for i, img in enumerate(src.images):
        extra = {"exif": exif.tobytes()} if i % 4 == 0 else {}
        Image.fromarray(img).save(d / f"{i}.jpg", quality=100, subsampling=0, **extra)
        lines.append(f"{i}.jpg {int(src.labels[i])}\n")
    (d / "list.txt").write_text("".join(lines))
    return read_list_file(str(d / "list.txt"))


def seeded_windows(seeds, view, scale):
    """(top, left, h, w) per seed: what the torchvision backend's MoCo views crop."""
    return np.array([rrc_params(int(view_seeds([s], view)[0]), H, W, scale, RRC_RATIO)
                     for s in seeds], dtype=np.float64)


@pytest.mark.parametrize("augment,data", [("imagenet", "arrays"), ("imagenet", "jpegs"),
                                          ("moco", "arrays"), ("moco", "jpegs")])
def test_dali_windows_are_the_seeds_rrc_params_windows(augment, data, coords, coord_jpegs,
                                                       tmp_path):
    """DALI crops the window batch_aug.rrc_params draws from the sample's seed (view 0 for
    "imagenet", views 0 and 1 for MoCo: the torchvision MoCo path's windows), from arrays
    and from JPEG files: width and height read back within the slope's rounding error and a
    quarter pixel (JPEG noise; seen: 0.28 px), the centre within a quarter pixel (seen: 0.07;
    a window one pixel off is caught). MoCo views are read where the shared stage drew no
    colour jitter and no grayscale."""
    src = coords if data == "arrays" else coord_jpegs
    scale = MOCO["scale"] if augment == "moco" else RRC_SCALE
    x, seeds, items = run("dali", src, augment, True, OUT, tmp_path)
    for view in (0, 1) if augment == "moco" else (0,):
        keep = np.ones(len(seeds), bool)
        xv = x
        if augment == "moco":
            p = draw_params(view_seeds(seeds, view), 3, MOCO)
            keep = ~p["jitter"] & ~p["gray"]
            xv = x[torch.from_numpy(keep), view]
        top, left, h, w = seeded_windows(seeds[keep], view, scale).T
        got_w, got_h, _, (cx, cy) = windows(xv)
        tol = SLOPE_ERR_PX + 0.25
        assert np.abs(got_w - w).max() <= tol, (view, np.abs(got_w - w).max())
        assert np.abs(got_h - h).max() <= tol, (view, np.abs(got_h - h).max())
        assert np.abs(cx - (left + w / 2)).max() <= 0.25, (view, np.abs(cx - left - w / 2).max())
        assert np.abs(cy - (top + h / 2)).max() <= 0.25, (view, np.abs(cy - top - h / 2).max())
