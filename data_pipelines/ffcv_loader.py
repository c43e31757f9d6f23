"""FFCV backend: .beton files written from our sources, read in OUR sampler's order.

Why FFCV: it decodes and augments whole batches in numba-compiled code over a memory-mapped
file, several times faster than PIL + torchvision on a few CPU cores.

- A .beton is a 1:1 copy of one dataset (after LT subsetting): item i of the beton is item i
  of the dataset, so sampler indices need no mapping. Its name is a fingerprint of the
  dataset's content (paths or pixels, and labels), so a changed list or subset never reuses a
  stale file; `write_beton` writes it (tools/write_beton.py is the CLI) and `ensure_beton`
  writes it on first use under a file lock, so DDP ranks wait for one writer.
- A file goes to its final name only when complete (temporary name + os.replace); an
  unreadable image is reported with its path. With data.on_bad_image=skip it is stored as a
  placeholder, listed in the side file ``<beton>.json``, and dropped from batches at load time.
- Order: a custom TraversalOrder hands FFCV ``our sampler``'s indices for the current
  (epoch, start_batch, rank), so class-aware / cb / sqrt sampling and DDP sharding are the
  torchvision ones. FFCV's own shuffling and `distributed` flag are not used.
- Augmentation: FFCV's random-resized-crop / center-crop decoders, plus numba operations
  written here for what FFCV lacks: pad-crop + flip ("small"), MoCo's color jitter, grayscale
  and Gaussian blur, center crop, an in-place flip, and normalization straight into NCHW
  float32 with the model's channel count (flip fused in). On a GPU machine the pipeline stops
  at uint8 and the batch is normalized on the GPU (4x less to copy, no CPU time). FFCV's random
  draws are not seeded per sample, so mid-epoch resume repeats the order but not the pixels.
- Batches are views of FFCV's ring buffers, which are reused across epochs: valid until the
  next batch or two are taken (clone to keep them); the engine uses each batch before asking
  for the next.

This is the only module that imports ffcv and numba (loaders.py imports it on demand).
"""
from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import replace
from typing import Optional

import numba
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   SimpleRGBImageDecoder)
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.traversal_order.base import TraversalOrder
from ffcv.writer import DatasetWriter

from .loaders import (MOCO, RRC_RATIO, RRC_SCALE, AugmentSpec, flatten_source, moco_blur_kernel,
                      note_skips)
from .sources import DataError

log = logging.getLogger("data_pipelines.ffcv")
SIDECAR_FORMAT = 1


def _set_threads_numba_only(cls, n):
    """FFCV's Compiler.set_num_threads also calls torch.set_num_threads, from its loader thread,
    silently changing the engine's thread count; keep numba's setting only."""
    n = int(n) if n and n > 0 else (os.cpu_count() or 1)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    cls.num_threads = n
    numba.set_num_threads(n)


Compiler.set_num_threads = classmethod(_set_threads_numba_only)


# ----------------------------------------------------------------------------- naming

def dataset_fingerprint(source) -> str:
    """``<name>-<items>-<hash>``: the hash covers paths (or pixels) and labels in order."""
    flat = flatten_source(source)
    h = hashlib.sha1()
    h.update(f"{flat.kind}\0{getattr(flat.base, 'name', '')}\0".encode())
    if flat.kind == "files":
        h.update(f"{flat.base.root}\0".encode())
        for i in flat.index.tolist():
            h.update(flat.base.paths[i].encode() + b"\0")
    elif flat.kind == "array":
        h.update(str(flat.base.images.shape[1:]).encode())
        for start in range(0, len(flat.index), 8192):  # bounded memory on big arrays
            h.update(np.ascontiguousarray(flat.base.images[flat.index[start:start + 8192]]))
    h.update(flat.labels.tobytes())
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", str(getattr(flat.base, "name", "data")))[:40]
    return f"{name}-{len(flat)}-{h.hexdigest()[:12]}"


def beton_path_for(source, directory: str) -> str:
    return os.path.join(directory, dataset_fingerprint(source) + ".beton")


def sidecar_path(beton: str) -> str:
    return beton + ".json"


def read_sidecar(beton: str) -> dict:
    try:
        with open(sidecar_path(beton)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DataError(f"{sidecar_path(beton)}: unreadable side file of {beton} ({exc}); "
                        f"delete both and rewrite with tools/write_beton.py") from exc


# ----------------------------------------------------------------------------- writing

def _placeholder() -> np.ndarray:
    """Stored in place of an unreadable image (and never delivered): big enough for every
    decoder's crop arithmetic."""
    return np.full((32, 32, 3), 128, np.uint8)


class _WriterItems:
    """What FFCV's writer processes read: (HWC uint8 RGB image, label, ok flag).

    Runs inside FFCV's worker processes, where an exception would hang the writer (it waits
    for a sample count that never comes), so errors are recorded in a side file instead and
    the item becomes a placeholder. In 'fail' mode, once an error is recorded the other
    workers stop decoding so the write ends fast.
    """

    def __init__(self, flat, error_file: str, fail_fast: bool):
        self.flat, self.error_file, self.fail_fast = flat, error_file, fail_fast
        self.max_bytes, self.max_side, self.mode = 1 << 23, None, "jpg"

    def __len__(self):
        return len(self.flat)

    def _image(self, i: int) -> np.ndarray:
        flat = self.flat
        if flat.kind == "array":
            img = flat.array(i)
        elif flat.kind == "files":
            from PIL import Image

            path = flat.path(i)
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        else:
            img = flat.load_hwc(i)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an HWC uint8 image with 1, 3 or 4 channels, got "
                             f"{img.dtype} {img.shape}")
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        elif img.shape[2] == 4:
            img = img[:, :, :3]
        h, w = img.shape[:2]
        if self.max_side and max(h, w) > self.max_side:
            r = self.max_side / max(h, w)
            h, w = int(h * r), int(w * r)
        # FFCV's writer dies (and hangs) on a sample larger than its page: refuse it here.
        # JPEG is assumed to compress at least 4x.
        need = h * w * 3 // (4 if self.mode == "jpg" else 1)
        if max(h, w) > 65535 or need > self.max_bytes:
            raise ValueError(f"image {w}x{h} is too large for the .beton (FFCV limits a "
                             f"sample to {self.max_bytes >> 20} MiB); write with --max-side")
        return np.ascontiguousarray(img)

    def __getitem__(self, i):
        label = int(self.flat.labels[i])
        if self.fail_fast and os.path.exists(self.error_file):
            return _placeholder(), label, 0
        try:
            return self._image(i), label, 1
        except Exception as exc:  # noqa: BLE001  (any failure must not reach FFCV's worker)
            reason = str(exc).replace("\n", " ").replace("\t", " ")
            if isinstance(exc, FileNotFoundError):
                reason = "image file not found"
            with open(self.error_file, "a") as f:
                f.write(f"{i}\t{self.flat.describe(i)}\t{type(exc).__name__}: {reason}\n")
            return _placeholder(), label, 0


def _pil_resizer(image, target_resolution):
    """FFCV's resizer (longer side down to ``target_resolution``, area filter) with PIL."""
    if target_resolution is None:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    ratio = target_resolution / max(h, w)
    if ratio >= 1:
        return image
    size = (int(ratio * w), int(ratio * h))
    return np.asarray(Image.fromarray(image).resize(size, Image.BOX))


def _pil_encode_jpeg(numpy_image, quality):
    """FFCV's JPEG encoder (RGB pixels in, JPEG bytes out) with PIL."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(numpy_image).save(buf, format="JPEG", quality=int(quality))
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class _WorkerWatch:
    """Turn a dead or stuck FFCV writer process into an error instead of a hang.

    FFCV's DatasetWriter waits until its workers report every sample and then for each
    worker's allocation list, with no check that the workers are alive: one killed worker
    (out of memory, a signal, a crash in a C library) makes it wait forever. While active,
    this records the processes, the progress counter and the queues the writer creates
    (by wrapping the names ffcv.writer uses) and, when a worker dies with a non-zero exit
    code or no image is finished for ``stall_s`` seconds, stops the workers and releases the
    writer's waits.
    """

    def __init__(self, num_samples: int, stall_s: float = 600.0):
        import ffcv.fields.rgb_image as rgb
        import ffcv.writer as w

        self.w, self.rgb, self.n, self.stall_s = w, rgb, int(num_samples), float(stall_s)
        self.procs, self.values, self.queues = [], [], []
        self.failure = None
        self._stop = threading.Event()

    def __enter__(self):
        w = self.w
        self.saved = (w.Process, w.Value, w.Queue)
        base_process, base_value, base_queue = self.saved

        def process(*a, **k):
            p = base_process(*a, **k)
            self.procs.append(p)
            return p

        def value(*a, **k):
            v = base_value(*a, **k)
            self.values.append(v)
            return v

        def make_queue(*a, **k):
            q = base_queue(*a, **k)
            self.queues.append(q)
            return q

        w.Process, w.Value, w.Queue = process, value, make_queue
        # The workers are forked from this process, which may run other threads (torch,
        # DALI, FFCV loaders); OpenCV's thread pool is not fork-safe and was seen to hang a
        # worker in cv2.resize. PIL does the same resize and JPEG encoding without threads.
        self.saved_codecs = (self.rgb.resizer, self.rgb.encode_jpeg)
        self.rgb.resizer, self.rgb.encode_jpeg = _pil_resizer, _pil_encode_jpeg
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        last, since = -1, time.monotonic()
        while not self._stop.wait(0.2):
            done = self.values[0].value if self.values else 0
            if done != last:
                last, since = done, time.monotonic()
            dead = [p for p in self.procs if p.exitcode not in (None, 0)]
            stalled = self.procs and time.monotonic() - since > self.stall_s
            if not dead and not stalled:
                continue
            if dead:
                self.failure = (f"an FFCV writer process died (exit code {dead[0].exitcode}) "
                                f"while converting")
            else:
                self.failure = (f"the FFCV writer processes made no progress for "
                                f"{self.stall_s:.0f} s (at {done} of {self.n} images)")
            for p in self.procs:
                if p.exitcode is None:
                    p.terminate()
            for p in self.procs:
                p.join(timeout=5)
            if self.values:                    # the progress counter: end the wait
                self.values[0].value = self.n
            if len(self.queues) >= 2:          # the allocations queue: one list per worker
                for _ in self.procs:
                    self.queues[1].put([])
            return

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.w.Process, self.w.Value, self.w.Queue = self.saved
        self.rgb.resizer, self.rgb.encode_jpeg = self.saved_codecs
        return False


def write_beton(source, out_path: str, *, max_side: Optional[int] = None,
                jpeg_quality: int = 90, mode: str = "auto", workers: int = 0,
                on_bad_image: str = "fail") -> dict:
    """Write ``source`` (a dataset source, LT subsets included) to ``out_path``.

    mode: 'raw' (lossless pixels; the default for in-memory arrays such as Fashion-MNIST),
    'jpg' (re-encoded at ``jpeg_quality``; the default for image files) or 'smart' (FFCV's
    choice per image). ``max_side`` shrinks larger images first. Returns the side-file dict.
    """
    flat = flatten_source(source)
    if len(flat) == 0:
        raise DataError(f"{out_path}: the data set is empty; nothing to write")
    if mode == "auto":
        mode = "raw" if flat.kind == "array" else "jpg"
    if mode not in ("raw", "jpg", "smart"):
        raise DataError(f"write_beton: mode {mode!r}; expected auto, raw, jpg or smart")
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"write_beton: JPEG quality {jpeg_quality} must lie in 1..100")
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    errors = tmp + ".errors"
    field = RGBImageField(write_mode=mode, max_resolution=max_side or None,
                          jpeg_quality=int(jpeg_quality),
                          smart_threshold=(256 * 256 * 3 if mode == "smart" else None))
    fields = {"image": field, "label": IntField(), "ok": IntField()}
    workers = int(workers) if workers and workers > 0 else (os.cpu_count() or 1)
    try:
        items = _WriterItems(flat, errors, fail_fast=on_bad_image == "fail")
        # FFCV gives each writer process its own pages: small pages for small images keep a
        # small data set from growing to workers x 8 MiB.
        small = flat.kind == "array" and flat.base.images[0].nbytes * 3 <= (1 << 18)
        page = (1 << 21) if small else (1 << 23) if mode == "jpg" else (1 << 26)
        items.max_bytes, items.max_side, items.mode = page, max_side, mode
        writer = DatasetWriter(tmp, fields, page_size=page, num_workers=min(workers, len(flat)))
        # FFCV forks its workers from this process. Collect garbage here and freeze what is
        # left, so a worker's garbage collector never finalizes objects whose destructors
        # need this process's threads (a dead DALI pipeline was seen to hang a worker so).
        gc.collect()
        gc.freeze()
        try:
            with _WorkerWatch(len(flat)) as watch:
                writer.from_indexed_dataset(
                    items, chunksize=max(1, min(100, len(flat) // (4 * workers) or 1)))
        finally:
            gc.unfreeze()
        if watch.failure:
            raise DataError(f"{out_path}: {watch.failure}; nothing was written")
        bad = []
        if os.path.exists(errors):
            with open(errors) as f:
                for line in f:
                    i, where, why = line.rstrip("\n").split("\t", 2)
                    bad.append([int(i), where, why])
            bad.sort()
        if bad and on_bad_image == "fail":
            first = "; ".join(f"{w}: {why}" for _, w, why in bad[:3])
            raise DataError(f"cannot read {len(bad)} image(s) while writing {out_path}: "
                            f"{first}{' ...' if len(bad) > 3 else ''}; fix or remove them, or "
                            f"skip them (data.on_bad_image: skip / write_beton.py --skip-bad)")
        meta = {"format": SIDECAR_FORMAT, "items": len(flat),
                "fingerprint": dataset_fingerprint(source), "kind": flat.kind,
                "channels": flat.channels, "mode": mode, "max_side": max_side,
                "jpeg_quality": int(jpeg_quality), "bad": bad}
        with open(tmp + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp + ".json", sidecar_path(out_path))
        os.replace(tmp, out_path)
        if bad:
            log.warning("%s: %d unreadable image(s) stored as placeholders and skipped at "
                        "load time (first: %s)", out_path, len(bad), bad[0][1])
        return meta
    finally:
        for p in (tmp, errors, tmp + ".json"):
            if os.path.exists(p):
                os.remove(p)


def ensure_beton(source, directory: str, on_bad_image: str = "fail", **write_kwargs) -> str:
    """Path of this dataset's .beton in ``directory``, written first if missing.

    A lock on the folder serializes writers (DDP ranks, parallel jobs); the others wait and
    then reuse the file.
    """
    path = beton_path_for(source, directory)
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)  # lock the folder itself: no lock files left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not os.path.exists(path):
            log.warning("writing FFCV data set %s (%d images; tools/write_beton.py can do this "
                        "ahead of time)", path, len(source))
            write_beton(source, path, on_bad_image=on_bad_image, **write_kwargs)
    finally:
        os.close(fd)  # releases the lock
    return path


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


# ----------------------------------------------------------------------------- loading

def _field(reader, name: str):
    """A field's metadata column (FFCV names the columns f0, f1, ... in field order)."""
    return reader.metadata[f"f{reader.field_names.index(name)}"]


class _GivenOrder(TraversalOrder):
    """FFCV traversal order = the index array we set before each epoch (our sampler's share).

    FFCV builds orders with ``order(loader)``; this instance returns itself from that call.
    """

    def __init__(self):  # noqa: D107  (no super(): bound to the loader in __call__)
        self.order = np.zeros(0, dtype=np.uint64)

    def __call__(self, loader):
        self.loader, self.indices = loader, loader.indices
        self.seed, self.distributed, self.sampler = loader.seed, False, None
        return self

    def sample_order(self, epoch: int):
        return self.order


# FFCV compiles a loader's whole pipeline with numba on its first epoch (seconds to tens of
# seconds); loaders that differ only in their sampler (uniform / class-aware / cb, or ranks in
# one process) share one compiled FFCV loader.
_COMPILED: dict = {}


def _reuse_buffers(loader) -> None:
    """Keep one set of FFCV's batch buffers for every epoch.

    FFCV allocates them anew per epoch; with float32 output that is ~150 MB of fresh pages
    for a 64 x 224 px batch ring, and zeroing them cost ~13% of an epoch's throughput here.
    Safe because a loader runs one epoch at a time (FfcvLoader joins the previous one).
    """
    graph, cache = loader.graph, {}
    allocate = graph.allocate_memory

    def cached(batch_size, batches):
        if (batch_size, batches) not in cache:
            cache[(batch_size, batches)] = allocate(batch_size, batches)
        return cache[(batch_size, batches)]

    graph.allocate_memory = cached


def sampler_indices(sampler) -> np.ndarray:
    """The sampler's current epoch share as FFCV wants it (uint64 item indices)."""
    idx = [k[0] if isinstance(k, tuple) else k for k in iter(sampler)]
    return np.asarray(idx, dtype=np.uint64)


class FfcvLoader:
    """Batches of one dataset's .beton in sampler order: ``(images, labels)``."""

    def __init__(self, path: str, dataset, sampler, batch_size: int, spec: AugmentSpec, *,
                 seed: int = 0, threads: int = 1, on_bad_image: str = "fail",
                 batches_ahead: int = 2, device=None):
        self.path, self.sampler, self.batch_size, self.spec = path, sampler, batch_size, spec
        self.flat = flatten_source(dataset.source)
        self.labels = torch.from_numpy(self.flat.labels)
        self.skipped = 0
        self.batch_indices = None   # dataset indices of the batch last yielded
        meta = read_sidecar(path)
        reader = Reader(path)
        if reader.num_samples != len(self.flat) or not np.array_equal(
                np.asarray(_field(reader, "label")), self.flat.labels):
            raise DataError(f"{path}: holds {reader.num_samples} items whose labels do not "
                            f"match the {len(self.flat)}-item data set; delete it and rewrite it "
                            f"with tools/write_beton.py")
        ok = np.asarray(_field(reader, "ok")) if "ok" in reader.field_names else None
        self.bad = {int(i) for i in np.nonzero(ok == 0)[0]} if ok is not None else set()
        self.bad_why = {int(b[0]): f"{b[1]}: {b[2]}" for b in meta.get("bad", [])}
        if self.bad and on_bad_image == "fail":
            first = "; ".join(self.bad_why.get(i, f"item {i}") for i in sorted(self.bad)[:3])
            raise DataError(f"{path}: {len(self.bad)} image(s) were unreadable when it was "
                            f"written ({first}); fix them and rewrite it, or set "
                            f"data.on_bad_image: skip")
        image = _field(reader, "image")
        self._check_sizes(image["width"], image["height"])
        self.stored_channels = int(meta.get("channels", 3))
        self.device = torch.device(device) if device is not None else None
        self.on_device = self.device is not None
        self._constants = {}   # device -> normalisation tensors (_device_constants)
        key = (os.path.abspath(path), os.path.getmtime(path), spec, int(batch_size),
               max(1, int(threads)), int(batches_ahead), self.on_device)
        if key not in _COMPILED:
            pipes = self._pipelines(int(image["width"].max()), int(image["height"].max()))
            loader = Loader(path, batch_size=batch_size, num_workers=key[4],
                            order=_GivenOrder(), pipelines=pipes, drop_last=False,
                            seed=int(seed) % (2 ** 31), batches_ahead=batches_ahead)
            _reuse_buffers(loader)
            _COMPILED[key] = loader
        self.loader = _COMPILED[key]
        self._epoch_it = None

    def _check_sizes(self, widths, heights):
        fixed = self.spec.kind == "none" or (self.spec.kind == "small")
        if fixed and len(widths) and (widths.min() != widths.max()
                                      or heights.min() != heights.max()):
            raise DataError(f"{self.path}: data.augment = {self.spec.kind!r} with FFCV needs "
                            f"images of one size, found {widths.min()}..{widths.max()} x "
                            f"{heights.min()}..{heights.max()} px; use augment 'imagenet' or "
                            f"the torchvision/DALI loader")

    def _pipelines(self, width: int, height: int) -> dict:
        s = self.spec

        def finish(flip: bool) -> list:
            """Normalize to float32 NCHW here (CPU training), or hand over uint8 HWC for the
            wrapper to normalize on the GPU (4x less to copy, no CPU time)."""
            if self.on_device:
                return ([RandomFlip()] if flip else []) + [ToTensor()]
            return [NormalizeCHW(s.mean, s.std, s.channels, self.stored_channels, flip=flip),
                    ToTensor()]

        off = {"label": None, "ok": None}
        if s.kind == "small":
            if s.train:
                ops = [SimpleRGBImageDecoder(), PadCropFlip(s.size, s.pad)]
            elif (width, height) == (s.size, s.size):
                ops = [SimpleRGBImageDecoder()]
            elif width >= s.size and height >= s.size:
                ops = [SimpleRGBImageDecoder(), CenterCrop(s.size)]
            else:
                raise DataError(f"{self.path}: images are {width}x{height} px, smaller than "
                                f"data.image_size={s.size}; the small eval recipe only crops")
            return {**off, "image": ops + finish(False)}
        if s.kind == "none":
            return {**off, "image": [SimpleRGBImageDecoder()] + finish(False)}
        if not s.train:  # imagenet and moco evaluate alike: resize 256/224, center crop
            dec = CenterCropRGBImageDecoder((s.size, s.size), ratio=s.size / s.eval_resize)
            return {**off, "image": [dec] + finish(False)}
        if s.kind == "imagenet":
            dec = RandomResizedCropRGBImageDecoder((s.size, s.size), RRC_SCALE, RRC_RATIO)
            return {**off, "image": [dec] + finish(True)}

        def view():
            dec = RandomResizedCropRGBImageDecoder((s.size, s.size), MOCO["scale"], RRC_RATIO)
            return PipelineSpec("image", decoder=dec, transforms=[MocoColor(s.size)] + finish(True))

        return {**off, "image": None, "view0": view(), "view1": view()}

    def _normalize_on_device(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalized float32 contiguous [B, C, H, W] on the device.

        The copy is blocking on purpose: x lives in FFCV's pinned ring buffer, whose slot FFCV's
        thread refills as soon as we hand the batch on, so an asynchronous copy could read the
        next batch's bytes. It waits for the copy only, not for queued GPU work."""
        x = x.to(self.device, non_blocking=False).permute(0, 3, 1, 2).float()
        gray, mean, std = self._device_constants(x.device)
        if gray is not None:
            x = (x * gray).sum(1, keepdim=True)
        elif self.spec.channels == 1:
            x = x[:, :1]
        return ((x - mean) / std).contiguous()

    def _device_constants(self, device: torch.device):
        """(gray weights or None, mean x 255, std x 255) on `device`, built once per device
        rather than for every view of every batch."""
        cache = self._constants
        if device not in cache:
            s = self.spec
            gray = None
            if s.channels == 1 and self.stored_channels != 1:
                gray = torch.tensor([0.2989, 0.587, 0.114], device=device).view(1, 3, 1, 1)
            mean = torch.tensor(s.mean, device=device).view(1, -1, 1, 1) * 255
            std = torch.tensor(s.std, device=device).view(1, -1, 1, 1) * 255
            cache[device] = (gray, mean, std)
        return cache[device]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size + (len(self.sampler) % self.batch_size > 0)

    def close(self):
        """Stop FFCV's loader thread (numba's thread pool must not run two pipelines at once).

        The thread ends an epoch with a put() that has no timeout: when the consumer left
        early with the queue full, that put blocks until someone takes from the queue, so
        drain it while waiting.
        """
        it, self._epoch_it = self._epoch_it, None
        if it is None:
            return
        it.close()
        while it.is_alive():
            try:
                while True:
                    it.output_queue.get_nowait()
            except queue.Empty:
                pass
            it.join(timeout=0.05)

    def __iter__(self):
        # Loaders that share one compiled FFCV loader share its buffers: one epoch at a time.
        active = getattr(self.loader, "_active_owner", None)
        if active is not None and active is not self:
            active.close()
        self.close()
        self.loader._active_owner = self
        order = sampler_indices(self.sampler)
        self.loader.traversal_order.order = order
        self.loader.first_traversal_order = order  # FFCV sizes the epoch from this
        if len(order) == 0:
            return
        self._epoch_it = it = iter(self.loader)
        bs = self.batch_size
        try:
            for b, out in enumerate(it):
                chunk = order[b * bs:(b + 1) * bs]
                y = self.labels[torch.from_numpy(chunk.astype(np.int64))]
                if self.on_device:
                    out = [self._normalize_on_device(v) for v in out]
                x = out[0] if len(out) == 1 else torch.stack(out, dim=1)
                if self.bad:
                    keep = ~np.isin(chunk, np.fromiter(self.bad, np.uint64))
                    if not keep.all():
                        note_skips(self, [self.bad_why.get(int(i), f"{self.path} item {int(i)}")
                                          for i in chunk[~keep]])
                        if not keep.any():
                            raise DataError(f"every image of batch {b} is unreadable; check "
                                            f"the data set")
                        mask = torch.from_numpy(keep)
                        x, y = x[mask], y[mask]
                        chunk = chunk[keep]
                self.batch_indices = chunk.astype(np.int64)   # what the engine orders rows by
                yield x, y
        finally:
            self.close()
