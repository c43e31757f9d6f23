"""FFCV backend, operations: numba kernels and FFCV Operations for what FFCV lacks.

Center crop and normalization straight into NCHW float32 with the model's channel count. The
random parts FFCV cannot seed per sample (flip, the "small" crop, MoCo's colour and blur) are
batch_aug.py's, shared with the other backends. Part of the FFCV backend with ffcv_beton.py
and ffcv_loader.py.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numba
import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation

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


@numba.njit(nogil=True, cache=True, parallel=True)
def flip_in_place(images, rows):
    """Mirror images[rows] along the last axis, in place (float32 NCHW): one pass over half
    of each row, in parallel; torch's gather-flip-scatter took ~40 ms per 64 x 224 px batch."""
    n, c, h, w = images.shape
    for t in numba.prange(len(rows) * c * h):
        i, rest = rows[t // (c * h)], t % (c * h)
        k, y = rest // h, rest % h
        row = images[i, k, y]
        for x in range(w // 2):
            v = row[x]
            row[x] = row[w - 1 - x]
            row[w - 1 - x] = v


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


# ----------------------------------------------------------------------------- operations

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
    """uint8 HWC -> normalized float32 CHW with the model's channel count, in one pass."""

    def __init__(self, mean, std, out_channels: int, stored_channels: int):
        super().__init__()
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (-mean / std).astype(np.float32)
        self.out_channels = int(out_channels)
        self.stored_channels = int(stored_channels)

    def generate_code(self):
        my_range = Compiler.get_iterator()
        scale, offset = self.scale, self.offset
        luma = self.out_channels == 1 and self.stored_channels != 1

        def normalize(images, dst):
            n = images.shape[0]
            for i in my_range(n):
                _normalize_chw(images[i], dst[i], scale, offset, False, luma)
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
