"""MoCo v2 aug+'s colour and blur stages and the final normalisation, batched on tensors.

One implementation for every backend (torchvision, DALI, FFCV) instead of one per backend:
each backend decodes, crops (and may flip) natively and hands over uint8 ``[B, C, H, W]`` or
``[B, V, C, H, W]``; this module does the rest on whatever device the batch is on (the GPU
when there is one). Every random draw comes from the sample's seed (our samplers' per-sample
seeds), so the same seed gives the same pixels in every backend and after a resume.

Semantics are torchvision's (the reference's): ColorJitter with its four parts in a random
order per sample, RandomGrayscale, GaussianBlur with reflect padding, on [0, 1] floats.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .samplers import mix_seeds

# torchvision's rgb_to_grayscale weights (not a recipe parameter: the recipes live in
# augment.py, which this module does not import, so augment.py can use it)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniforms(seeds, count: int) -> np.ndarray:
    """``count`` independent U[0, 1) draws per seed (splitmix64): ``[len(seeds), count]``."""
    with np.errstate(over="ignore"):
        z = np.asarray(seeds, dtype=np.int64).astype(np.uint64)[:, None] + \
            _GOLDEN * np.arange(1, count + 1, dtype=np.uint64)[None, :]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def view_seeds(seeds, view: int) -> np.ndarray:
    """The seeds of one view (MoCo's two views of a sample draw independently)."""
    return (uniforms(seeds, 1)[:, 0] * float(1 << 62)).astype(np.int64) ^ (view * 0x5A5A5A5A)


def small_crop_params(seed: int, height: int, width: int, size: int, pad: int) -> tuple:
    """(top, left, flip) of the "small" recipe's crop, in padded coordinates, from 64
    well-mixed bits of the seed (the torchvision backend's SmallImageTransform uses it too)."""
    h = mix_seeds(seed)
    span_y, span_x = height + 2 * pad - size + 1, width + 2 * pad - size + 1
    if span_y < 1 or span_x < 1:
        raise ValueError(f"small augmentation: image {height}x{width} is smaller than "
                         f"data.image_size={size} even after padding")
    return h % span_y, (h >> 20) % span_x, bool((h >> 40) & 1)


def pad_crop_flip(x: torch.Tensor, seeds, size: int, pad: int) -> torch.Tensor:
    """The "small" train crop of a batch [B, C, H, W] (any dtype), each sample from its seed."""
    n, _, h, w = x.shape
    params = np.array([small_crop_params(int(s), h, w, size, pad) for s in seeds],
                      dtype=np.int64).reshape(-1, 3)
    top, left, flip = (torch.from_numpy(params[:, k]).to(x.device) for k in range(3))
    ar = torch.arange(size, device=x.device)
    rows = top[:, None] + ar
    cols = left[:, None] + torch.where(flip[:, None].bool(), size - 1 - ar, ar)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None]]
    return out.permute(0, 3, 1, 2).contiguous()


def flip_mask(seeds, p: float = 0.5) -> np.ndarray:
    """Which samples flip: draw 12 of each seed's stream (draw_params' "flip")."""
    return uniforms(seeds, 13)[:, 12] < p


def flip_rows(x: torch.Tensor, seeds, p: float = 0.5) -> torch.Tensor:
    """Mirror (in place, last axis) the samples whose seed draws a flip (draw_params' flip)."""
    rows = np.nonzero(flip_mask(seeds, p))[0]
    if len(rows):
        idx = torch.from_numpy(rows).to(x.device)
        x[idx] = x[idx].flip(-1)
    return x


def rrc_params(seed: int, height: int, width: int, scale, ratio) -> tuple:
    """(top, left, h, w) of torchvision's RandomResizedCrop window, drawn from ``seed``
    (draws 13..52 of its stream: independent of draw_params', which uses 0..12)."""
    return _rrc_window(uniforms([seed], 53)[0][13:], height, width, scale, ratio)


def rrc_windows(seeds, sizes, scale, ratio) -> np.ndarray:
    """``rrc_params`` of many samples at once (the same windows; one draw of the streams for
    the batch instead of one per sample): ``sizes`` are (height, width) pairs; int64
    ``[n, 4]`` rows of (top, left, h, w)."""
    u = uniforms(seeds, 53)[:, 13:].tolist() if len(seeds) else []
    return np.array([_rrc_window(d, int(h), int(w), scale, ratio)
                     for d, (h, w) in zip(u, sizes)], dtype=np.int64).reshape(-1, 4)


def _rrc_window(u, height: int, width: int, scale, ratio) -> tuple:
    area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(10):
        target = area * (scale[0] + u[4 * k] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[4 * k + 1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (int(u[4 * k + 2] * (height - h + 1)), int(u[4 * k + 3] * (width - w + 1)),
                    h, w)
    in_ratio = width / height      # fallback: the whole image, cut to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(seeds, colour_channels: int, moco: dict, flip_p: float = 0.5) -> dict:
    """Per-sample parameters of one view (``moco``: the recipe, AugmentSpec.moco), as numpy
    arrays of length B."""
    u = uniforms(seeds, 12)
    b, c, s, h = moco["jitter"]

    def lo_hi(x, k):          # ColorJitter's factor range [max(0, 1 - x), 1 + x]
        return max(0.0, 1 - x) + u[:, k] * (1 + x - max(0.0, 1 - x))

    rgb = colour_channels == 3
    blur_lo, blur_hi = moco["blur_sigma"]
    return {
        "jitter": u[:, 0] < moco["jitter_p"],
        "order": np.argsort(u[:, 1:5], axis=1),          # a uniform random permutation
        "brightness": lo_hi(b, 5), "contrast": lo_hi(c, 6),
        "saturation": lo_hi(s, 7) if rgb else np.ones(len(u)),
        "hue": (u[:, 8] * 2 - 1) * h if rgb else np.zeros(len(u)),
        "gray": (u[:, 9] < moco["gray_p"]) & rgb,
        "blur": u[:, 10] < moco["blur_p"],
        "sigma": blur_lo + u[:, 11] * (blur_hi - blur_lo),
        "flip": flip_mask(seeds, flip_p),
    }


_GRAY: dict = {}   # (device, dtype) -> weights: built once, not per batch


def _gray(x: torch.Tensor) -> torch.Tensor:
    key = (x.device, x.dtype)
    if key not in _GRAY:
        _GRAY[key] = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * _GRAY[key]).sum(1, keepdim=True)


def _col(v, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=x.dtype).to(x.device, non_blocking=True).view(-1, 1, 1, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's RGB -> HSV on [B, 3, H, W] floats in [0, 1] (hue in [0, 1))."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eq = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(eq, torch.ones_like(maxc), maxc)
    crd = torch.where(eq, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB as channel = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6 with
    n = 5, 3, 1: torchvision's sector formula without its [B, 3, 6, H, W] temporaries (3x
    faster here)."""
    h, s, v = x.unbind(1)
    vs = v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h * 6.0 + n, 6.0)
        out.append(v - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1)


def _jitter_op(op: int, x: torch.Tensor, p: dict, rows: np.ndarray) -> torch.Tensor:
    """One of ColorJitter's parts (0 brightness, 1 contrast, 2 saturation, 3 hue) on rows."""
    if op == 0:
        return (x * _col(p["brightness"][rows], x)).clamp(0, 1)
    if op == 1:
        f = _col(p["contrast"][rows], x)
        m = (_gray(x) if x.shape[1] == 3 else x).mean((1, 2, 3), keepdim=True)
        return (f * x + (1 - f) * m).clamp(0, 1)
    if op == 2:
        f = _col(p["saturation"][rows], x)
        return (f * x + (1 - f) * _gray(x)).clamp(0, 1)
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + _col(p["hue"][rows], x)[:, 0], 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def gaussian_blur(x: torch.Tensor, sigma, ksize: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, reflect padding (torchvision's)."""
    n, c, h, w = x.shape
    half = (ksize - 1) * 0.5
    t = torch.linspace(-half, half, ksize, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / _col(sigma, x).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)            # [n * c, k]
    pad = ksize // 2
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, 1, ksize), groups=n * c)
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, ksize, 1), groups=n * c)
    return y.view(n, c, h, w)


def moco_colour(x: torch.Tensor, p: dict, ksize: int) -> torch.Tensor:
    """Jitter (p=0.8, random order), grayscale (p=0.2), blur (p=0.5) on [B, C, H, W] floats
    in [0, 1], each sample with its own parameters from ``p`` (draw_params)."""
    x = x.clone()
    on = p["jitter"]
    for slot in range(4):
        for op in range(4):
            rows = np.nonzero(on & (p["order"][:, slot] == op))[0]
            if op >= 2 and x.shape[1] != 3:
                continue                     # saturation and hue need colour
            if len(rows):
                idx = torch.from_numpy(rows).to(x.device)
                x[idx] = _jitter_op(op, x[idx], p, rows)
    rows = np.nonzero(p["gray"])[0]
    if len(rows):
        idx = torch.from_numpy(rows).to(x.device)
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    rows = np.nonzero(p["blur"])[0]
    if len(rows):
        idx = torch.from_numpy(rows).to(x.device)
        x[idx] = gaussian_blur(x[idx], p["sigma"][rows], ksize)
    return x


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, C, H, W] to the model's channel count (gray -> RGB by repeat, RGB -> gray by luma)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    return _gray(x)


class BatchAugment:
    """uint8 [B, C, H, W] (or [B, V, C, H, W]) -> normalised float32 for one AugmentSpec.

    What the backend left to this stage: ``flip`` (the random flip), ``crop`` (the "small"
    pad-crop-flip); the colour stage runs when the spec has one (MoCo train). ``gray_rgb``:
    the images are gray stored as RGB (a 1-channel model takes channel 0, no luma rounding).
    Every draw comes from the per-sample seeds. Constants are built once per device.
    """

    def __init__(self, spec, flip: bool = False, crop: bool = False, gray_rgb: bool = False):
        self.spec = spec
        self.crop = bool(crop) and spec.train and spec.kind == "small"
        self.flip = bool(flip) and spec.flip and not self.crop
        self.gray_rgb = bool(gray_rgb)
        self._constants: dict = {}

    def _norm(self, device):
        if device not in self._constants:
            mean = torch.tensor(self.spec.mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.spec.std, device=device).view(1, -1, 1, 1)
            self._constants[device] = (mean, 1.0 / std)
        return self._constants[device]

    @property
    def random(self) -> bool:
        return self.flip or self.crop or self.spec.colour

    def view(self, x: torch.Tensor, seeds) -> torch.Tensor:
        """One view: uint8 [B, C, H, W] with its per-sample seeds -> float32 normalised."""
        if self.random and (seeds is None or len(seeds) != len(x)):
            raise ValueError(f"BatchAugment: {len(x)} images need as many seeds, got "
                             f"{None if seeds is None else len(seeds)}")
        if self.gray_rgb and x.shape[1] == 3 and self.spec.channels == 1:
            x = x[:, :1]
        if self.crop:
            x = pad_crop_flip(x, seeds, self.spec.size, self.spec.pad)
        x = match_channels(x.float().div_(255.0), self.spec.channels)
        if self.spec.colour:
            p = draw_params(seeds, x.shape[1], self.spec.moco, self.spec.flip_p)
            x = moco_colour(x, p, self.spec.blur_kernel)
        if self.flip:
            x = flip_rows(x, seeds, self.spec.flip_p)
        mean, inv_std = self._norm(x.device)
        return ((x - mean) * inv_std).contiguous()

    def __call__(self, x: torch.Tensor, seeds=None) -> torch.Tensor:
        if x.dim() == 4:
            return self.view(x, seeds)
        return torch.stack([self.view(x[:, v], None if seeds is None else view_seeds(seeds, v))
                            for v in range(x.shape[1])], 1)
