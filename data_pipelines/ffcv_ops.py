"""FFCV backend, operations: numba kernels and FFCV Operations for what FFCV lacks.

Center crop and normalization straight into NCHW float32 with the model's channel count, and
a random-resized-crop decoder whose windows come from our per-sample seeds (FFCV's own draws
numpy's global generator from numba threads: not reproducible). The random parts after the
crop (flip, the "small" crop, MoCo's colour and blur) are batch_aug.py's, shared with the other
backends. Part of the FFCV backend with ffcv_beton.py and ffcv_loader.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
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


# The seeded window: batch_aug.rrc_params(view_seeds([s], view)[0], ...) in numba, draw for
# draw (splitmix64 as batch_aug.uniforms; no fastmath, so sqrt/exp/round agree with Python's).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True)
def _uniform(seed, j):
    """Draw j (1-based) of batch_aug.uniforms for one non-negative int64 seed."""
    z = np.uint64(seed) + _GOLDEN * np.uint64(j)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) / 9007199254740992.0


@numba.njit(cache=True)
def seeded_window(seed, view, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """(top, left, h, w) of view ``view``'s RandomResizedCrop for crop seed ``seed``."""
    s = np.int64(_uniform(seed, 1) * 4611686018427387904.0) ^ np.int64(view * 0x5A5A5A5A)
    area = float(height) * float(width)
    lo, hi = math.log(ratio_lo), math.log(ratio_hi)
    for k in range(10):
        target = area * (scale_lo + _uniform(s, 14 + 4 * k) * (scale_hi - scale_lo))
        aspect = math.exp(lo + _uniform(s, 15 + 4 * k) * (hi - lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (int(_uniform(s, 16 + 4 * k) * (height - h + 1)),
                    int(_uniform(s, 17 + 4 * k) * (width - w + 1)), h, w)
    in_ratio = float(width) / float(height)
    if in_ratio < ratio_lo:
        w, h = width, int(round(width / ratio_lo))
    elif in_ratio > ratio_hi:
        h, w = height, int(round(height * ratio_hi))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def index_bits(items: int) -> int:
    """Bits of an FFCV key that hold the item index; the rest (up to 63) hold a crop seed."""
    return max(1, int(items - 1).bit_length())


def crop_keys(indices: np.ndarray, seeds: np.ndarray, items: int) -> np.ndarray:
    """uint64 keys ``crop_seed << index_bits | index`` for SeededRandomResizedCrop: FFCV hands
    a decoder nothing per sample but the batch's indices, so the seed travels inside them."""
    crop = crop_seed_of(seeds, items)
    return (crop.astype(np.uint64) << np.uint64(index_bits(items))) | \
        np.asarray(indices, np.uint64)


def crop_seed_of(seeds: np.ndarray, items: int) -> np.ndarray:
    """The crop seed a key made by crop_keys carries (what seeded_window is given)."""
    return np.asarray(seeds, np.int64) & np.int64((1 << (63 - index_bits(items))) - 1)


# ----------------------------------------------------------------------------- operations

class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """FFCV's random-resized-crop decoder with the window drawn from the sample's seed.

    Reads keys made by crop_keys (the loader's order must hold them: only this field may be
    decoded from it, and the OS page cache must be the memory manager, which ignores indices);
    ``view`` tells MoCo's two views apart, as in the torchvision backend. Decoding (whole JPEG
    or raw pixels) and the area resize are FFCV's own.
    """

    def __init__(self, output_size, scale, ratio, items: int, view: int = 0):
        super().__init__(output_size)
        self.scale, self.ratio = tuple(map(float, scale)), tuple(map(float, ratio))
        self.bits, self.view = index_bits(items), int(view)

    @property
    def get_crop_generator(self):   # abstract in FFCV; the window is seeded_window's
        return None

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        (s_lo, s_hi), (r_lo, r_hi) = self.scale, self.ratio
        bits, mask, view = np.uint64(self.bits), np.uint64((1 << self.bits) - 1), self.view

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                key = np.uint64(batch_indices[dst_ix])
                field = metadata[key & mask]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = seeded_window(np.int64(key >> bits), view, np.int64(height),
                                           np.int64(width), s_lo, s_hi, r_lo, r_hi)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode



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
