"""FFCV backend, writing: .beton files from our sources (ffcv_loader.py reads them).

- A .beton is a 1:1 copy of one dataset (after LT subsetting): item i of the beton is item i
  of the dataset, so sampler indices need no mapping. Its name is a fingerprint of the
  dataset's content (paths or pixels, and labels), so a changed list or subset never reuses a
  stale file; `write_beton` writes it (tools/write_beton.py is the CLI) and `ensure_beton`
  writes it on first use under a file lock, so DDP ranks wait for one writer.
- A file goes to its final name only when complete (temporary name + os.replace); an
  unreadable image is reported with its path. With data.on_bad_image=skip it is stored as a
  placeholder, listed in the side file ``<beton>.json``, and dropped from batches at load time.

Part of the FFCV backend (with ffcv_ops.py and ffcv_loader.py): only these three modules
import ffcv or numba, and loaders.py imports them only once FFCV is asked for.
"""
from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import re
import threading
import time
from typing import Optional

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter

from .flat import flatten_source
from .sources import DataError

log = logging.getLogger("data_pipelines.ffcv")
SIDECAR_FORMAT = 1

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
