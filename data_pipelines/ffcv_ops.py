"""FFCV backend, operations: numba kernels and FFCV Operations for what FFCV lacks.

Pad-crop + flip ("small"), MoCo's color jitter, grayscale and Gaussian blur, center crop, an
in-place flip, and normalization straight into NCHW float32 with the model's channel count
(flip fused in). Part of the FFCV backend with ffcv_beton.py and ffcv_loader.py.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numba
import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

from .augment import MOCO, moco_blur_kernel
from .sources import DataError


def _set_threads_numba_only(cls, n):
    """FFCV's Compiler.set_num_threads also calls torch.set_num_threads, from its loader thread,
    silently changing the engine's thread count; keep numba's setting only."""
    n = int(n) if n and n > 0 else (os.cpu_count() or 1)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    cls.num_threads = n
    numba.set_num_threads(n)


Compiler.set_num_threads = classmethod(_set_threads_numba_only)

# ----------------------------------------------------------------------------- numba kernels
# Module-level and cached, so each process compiles them once (and later runs load them).

_JIT = dict(nogil=True, fastmath=True, cache=True)


@numba.njit(**_JIT)
def _pad_crop_flip(src, dst, top, left, flip):
    """dst = src padded with zeros, cropped at (top, left) (unpadded coordinates), flipped."""
    h, w, c = src.shape
    size_h, size_w = dst.shape[0], dst.shape[1]
    for y in range(size_h):
        sy = top + y
        for x in range(size_w):
            sx = left + (size_w - 1 - x if flip else x)
            inside = 0 <= sy < h and 0 <= sx < w
            for k in range(c):
                dst[y, x, k] = src[sy, sx, k] if inside else 0


@numba.njit(**_JIT)
def _normalize_chw(src, dst, scale, offset, flip, luma):
    """HWC uint8 RGB -> CHW float32 ``x * scale + offset`` per channel, mirrored if ``flip``.

    A 1-channel ``dst`` takes channel 0 (a gray image stored as RGB) or, with ``luma``,
    torchvision's RGB -> gray weights. Row slices keep the inner loop simple enough for LLVM
    to vectorize: this pass was the slowest stage of the whole pipeline when written per pixel.
    """
    h, w = src.shape[0], src.shape[1]
    s0, o0 = np.float32(scale[0]), np.float32(offset[0])
    if dst.shape[0] == 3:
        s1, s2 = np.float32(scale[1]), np.float32(scale[2])
        o1, o2 = np.float32(offset[1]), np.float32(offset[2])
    for y in range(h):
        row = src[y, ::-1] if flip else src[y]
        if dst.shape[0] == 3:
            d0, d1, d2 = dst[0, y], dst[1, y], dst[2, y]
            for x in range(w):
                d0[x] = np.float32(row[x, 0]) * s0 + o0
                d1[x] = np.float32(row[x, 1]) * s1 + o1
                d2[x] = np.float32(row[x, 2]) * s2 + o2
        elif luma:
            d0 = dst[0, y]
            for x in range(w):
                g = (np.float32(0.2989) * row[x, 0] + np.float32(0.587) * row[x, 1]
                     + np.float32(0.114) * row[x, 2])
                d0[x] = g * s0 + o0
        else:
            d0 = dst[0, y]
            for x in range(w):
                d0[x] = np.float32(row[x, 0]) * s0 + o0


@numba.njit(**_JIT)
def _clamp01(v):
    return min(max(v, 0.0), 1.0)


@numba.njit(**_JIT)
def _rgb_to_hsv(r, g, b):
    mx = max(r, max(g, b))
    mn = min(r, min(g, b))
    d = mx - mn
    s = d / mx if mx > 0 else 0.0
    if d <= 0:
        h = 0.0
    elif mx == r:
        h = ((g - b) / d) % 6.0
    elif mx == g:
        h = (b - r) / d + 2.0
    else:
        h = (r - g) / d + 4.0
    return h / 6.0, s, mx


@numba.njit(**_JIT)
def _hsv_to_rgb(h, s, v):
    h6 = (h % 1.0) * 6.0
    i = int(h6) % 6
    f = h6 - int(h6)
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    if i == 0:
        return v, t, p
    if i == 1:
        return q, v, p
    if i == 2:
        return p, v, t
    if i == 3:
        return p, q, v
    if i == 4:
        return t, p, v
    return v, p, q


@numba.njit(**_JIT)
def _reflect(i, n):
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * n - 2 - i
        if n == 1:
            return 0
    return i


@numba.njit(**_JIT)
def _moco_color(img, buf, tmp, jitter, jitter_p, gray_p, blur_lo, blur_hi, blur_p, ksize):
    """MoCo v2 color stage in place on one HWC uint8 RGB image, torchvision's semantics:
    ColorJitter (random op order) with p, grayscale with p, Gaussian blur (reflect) with p."""
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            for k in range(3):
                buf[y, x, k] = img[y, x, k] / 255.0
    if np.random.random() < jitter_p:
        order = np.arange(4)
        for j in range(3, 0, -1):  # Fisher-Yates
            r = np.random.randint(0, j + 1)
            order[j], order[r] = order[r], order[j]
        bf = np.random.uniform(max(0.0, 1 - jitter[0]), 1 + jitter[0])
        cf = np.random.uniform(max(0.0, 1 - jitter[1]), 1 + jitter[1])
        sf = np.random.uniform(max(0.0, 1 - jitter[2]), 1 + jitter[2])
        hf = np.random.uniform(-jitter[3], jitter[3])
        for op in order:
            if op == 0:
                for y in range(h):
                    for x in range(w):
                        for k in range(3):
                            buf[y, x, k] = _clamp01(buf[y, x, k] * bf)
            elif op == 1:
                m = 0.0
                for y in range(h):
                    for x in range(w):
                        m += 0.2989 * buf[y, x, 0] + 0.587 * buf[y, x, 1] + 0.114 * buf[y, x, 2]
                m /= h * w
                for y in range(h):
                    for x in range(w):
                        for k in range(3):
                            buf[y, x, k] = _clamp01(cf * buf[y, x, k] + (1 - cf) * m)
            elif op == 2:
                for y in range(h):
                    for x in range(w):
                        g = 0.2989 * buf[y, x, 0] + 0.587 * buf[y, x, 1] + 0.114 * buf[y, x, 2]
                        for k in range(3):
                            buf[y, x, k] = _clamp01(sf * buf[y, x, k] + (1 - sf) * g)
            else:
                for y in range(h):
                    for x in range(w):
                        hh, ss, vv = _rgb_to_hsv(buf[y, x, 0], buf[y, x, 1], buf[y, x, 2])
                        r, g, b = _hsv_to_rgb(hh + hf, ss, vv)
                        buf[y, x, 0], buf[y, x, 1], buf[y, x, 2] = r, g, b
    if np.random.random() < gray_p:
        for y in range(h):
            for x in range(w):
                g = 0.2989 * buf[y, x, 0] + 0.587 * buf[y, x, 1] + 0.114 * buf[y, x, 2]
                for k in range(3):
                    buf[y, x, k] = g
    if np.random.random() < blur_p:
        sigma = np.random.uniform(blur_lo, blur_hi)
        half = ksize // 2
        kern = np.empty(ksize, np.float32)
        total = 0.0
        for j in range(ksize):
            kern[j] = np.exp(-0.5 * ((j - half) / sigma) ** 2)
            total += kern[j]
        for j in range(ksize):
            kern[j] /= total
        for y in range(h):  # horizontal pass -> tmp
            for x in range(w):
                for k in range(3):
                    acc = 0.0
                    for j in range(ksize):
                        acc += kern[j] * buf[y, _reflect(x + j - half, w), k]
                    tmp[y, x, k] = acc
        for y in range(h):  # vertical pass -> buf
            for x in range(w):
                for k in range(3):
                    acc = 0.0
                    for j in range(ksize):
                        acc += kern[j] * tmp[_reflect(y + j - half, h), x, k]
                    buf[y, x, k] = acc
    for y in range(h):
        for x in range(w):
            for k in range(3):
                img[y, x, k] = np.uint8(min(max(buf[y, x, k] * 255.0 + 0.5, 0.0), 255.0))


# ----------------------------------------------------------------------------- operations

class PadCropFlip(Operation):
    """The "small" train recipe: zero-pad ``pad``, random ``size`` crop, random flip."""

    def __init__(self, size: int, pad: int):
        super().__init__()
        self.size, self.pad = int(size), int(pad)

    def generate_code(self):
        my_range = Compiler.get_iterator()
        size, pad = self.size, self.pad

        def pad_crop_flip(images, dst):
            n, h, w = images.shape[0], images.shape[1], images.shape[2]
            for i in my_range(n):
                top = np.random.randint(0, h + 2 * pad - size + 1) - pad
                left = np.random.randint(0, w + 2 * pad - size + 1) - pad
                _pad_crop_flip(images[i], dst[i], top, left, np.random.random() < 0.5)
            return dst[:n]

        pad_crop_flip.is_parallel = True
        return pad_crop_flip

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        if h + 2 * self.pad < self.size or w + 2 * self.pad < self.size:
            raise DataError(f"small augmentation: images are {w}x{h}, smaller than "
                            f"data.image_size={self.size} even after padding {self.pad}")
        shape = (self.size, self.size, c)
        return (replace(previous_state, jit_mode=True, shape=shape),
                AllocationQuery(shape, np.dtype("uint8")))


class RandomFlip(Operation):
    """Random horizontal flip of uint8 HWC images, in place (FFCV's copies every image)."""

    def generate_code(self):
        my_range = Compiler.get_iterator()

        def flip(images, dst):
            n, w = images.shape[0], images.shape[2]
            for i in my_range(n):
                if np.random.random() < 0.5:
                    img = images[i]
                    for y in range(img.shape[0]):
                        for x in range(w // 2):
                            for k in range(img.shape[2]):
                                t = img[y, x, k]
                                img[y, x, k] = img[y, w - 1 - x, k]
                                img[y, w - 1 - x, k] = t
            return images

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), None


class CenterCrop(Operation):
    """Center crop to ``size`` (the "small" eval recipe when images are larger)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def generate_code(self):
        my_range = Compiler.get_iterator()
        size = self.size

        def center_crop(images, dst):
            n, h, w = images.shape[0], images.shape[1], images.shape[2]
            top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            for i in my_range(n):
                _pad_crop_flip(images[i], dst[i], top, left, False)
            return dst[:n]

        center_crop.is_parallel = True
        return center_crop

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        shape = (self.size, self.size, c)
        return (replace(previous_state, jit_mode=True, shape=shape),
                AllocationQuery(shape, np.dtype("uint8")))


class NormalizeCHW(Operation):
    """uint8 HWC -> normalized float32 CHW with the model's channel count, and optionally the
    random horizontal flip, in one pass (FFCV's flip would copy every image once more)."""

    def __init__(self, mean, std, out_channels: int, stored_channels: int, flip: bool = False):
        super().__init__()
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)
        self.out_channels = int(out_channels)
        self.stored_channels = int(stored_channels)
        self.flip = bool(flip)

    def generate_code(self):
        my_range = Compiler.get_iterator()
        scale, offset = self.scale, self.offset
        luma = self.out_channels == 1 and self.stored_channels != 1
        random_flip = self.flip

        def normalize(images, dst):
            n = images.shape[0]
            for i in my_range(n):
                flip = random_flip and np.random.random() < 0.5
                _normalize_chw(images[i], dst[i], scale, offset, flip, luma)
            return dst[:n]

        normalize.is_parallel = True
        return normalize

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        if c != 3:
            raise DataError(f"NormalizeCHW: expected RGB images (as .beton stores them), got "
                            f"{c} channel(s)")
        shape = (self.out_channels, h, w)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("float32")),
                AllocationQuery(shape, np.dtype("float32")))


class MocoColor(Operation):
    """MoCo v2 aug+ color stage (jitter p=0.8, grayscale p=0.2, blur p=0.5), which FFCV lacks."""

    def __init__(self, size: int):
        super().__init__()
        self.ksize = moco_blur_kernel(size)

    def generate_code(self):
        my_range = Compiler.get_iterator()
        jitter = np.asarray(MOCO["jitter"], np.float64)
        jp, gp, bp = float(MOCO["jitter_p"]), float(MOCO["gray_p"]), float(MOCO["blur_p"])
        lo, hi = map(float, MOCO["blur_sigma"])
        ksize = int(self.ksize)

        def moco_color(images, mem):
            buf, tmp = mem
            n = images.shape[0]
            for i in my_range(n):
                _moco_color(images[i], buf[i], tmp[i], jitter, jp, gp, lo, hi, bp, ksize)
            return images

        moco_color.is_parallel = True
        return moco_color

    def declare_state_and_memory(self, previous_state):
        shape = previous_state.shape
        if shape[2] != 3:
            raise DataError(f"MoCo augmentation needs RGB images, got {shape[2]} channel(s)")
        return (replace(previous_state, jit_mode=True),
                (AllocationQuery(shape, np.dtype("float32")),
                 AllocationQuery(shape, np.dtype("float32"))))
