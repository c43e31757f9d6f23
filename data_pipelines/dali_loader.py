"""NVIDIA DALI backend: our samplers feed DALI through external_source.

Why DALI: its decoders (libjpeg-turbo on CPU, nvJPEG on GPU with ``device='mixed'``) and
operators run in a native thread pool, and for the train crop it decodes only the crop region
(``decoders.image_random_crop``), which a loader that decodes whole images cannot match.

- Input: the list file's images are read directly (raw bytes from each path, no conversion
  step); in-memory arrays (Fashion-MNIST, CIFAR) are fed as HWC uint8. Which items form which
  batch comes from OUR sampler (one external_source batch per sampler batch), so class-aware /
  cb / sqrt sampling, DDP shards and mid-epoch resume match the torchvision loader. Files
  are read a few batches ahead in a thread pool (`read_ahead`), not on the training thread
  where DALI calls the source.
- The feeder reads the sampler when DALI first pulls from it for an epoch, and DALI pulls only
  after ``reset()``, which we call at the start of each epoch, after ``set_epoch``. An epoch
  left early is cancelled: the feeder stops, the few batches DALI prefetched are drained.
- CPU machines: ``device_id=None`` and CPU operators; GPU machines: nvJPEG decoding and GPU
  operators, batches come out as CUDA tensors on the training device.
- Bad images: a missing or empty file, or one whose JPEG/PNG markers are broken (then checked by
  PIL), is caught before DALI sees it and reported with its path (or, with
  data.on_bad_image=skip, dropped from its batch and counted). If DALI's decoder still fails,
  the images of the recent batches are checked with PIL and the error names the culprit; in
  skip mode the pipeline is rebuilt without it and the epoch continues at the same batch.
- Augmentation: the same recipes with DALI operators (see `_graph`); the random draws are
  DALI's own (seeded per rank), so a resumed epoch repeats the order but not the pixels.
  MoCo's color jitter differs in two details: the order of its four parts is fixed, and the
  hue jitter is DALI's rotation in YIQ space (by up to the same +-36 degrees) rather than a
  shift in HSV; brightness, contrast (around each image's mean gray) and saturation (a blend
  with the luma image) are torchvision's.

This is the only module that imports nvidia.dali (loaders.py imports it on demand).
"""
from __future__ import annotations

import collections
import logging
import weakref

import numpy as np
from nvidia.dali import fn, math as dmath, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .augment import MOCO, RRC_RATIO, RRC_SCALE, AugmentSpec, moco_blur_kernel
from .flat import flatten_source, note_skips
from .samplers import mix_seeds
from .sources import DataError

log = logging.getLogger("data_pipelines.dali")
_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


def check_encoded(data: np.ndarray, path: str) -> str | None:
    """Why these bytes are not a decodable image, or None. Cheap marker checks first; only a
    suspicious file pays for a full PIL decode."""
    if data.size == 0:
        return "empty file"
    head = data[:8].tobytes()
    if head.startswith(_JPEG):
        if b"\xff\xd9" in data[-64:].tobytes():
            return None
    elif head.startswith(_PNG):
        if b"IEND" in data[-16:].tobytes():
            return None
    return pil_problem(path)


def pil_problem(path: str) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return None
    except FileNotFoundError:
        return "image file not found"
    except Exception as exc:  # noqa: BLE001  (PIL raises many kinds)
        return f"cannot decode image: {type(exc).__name__}: {exc}"


class _Feeder:
    """external_source input: batches of (encoded bytes or HWC arrays, [label]) in sampler order.

    DALI calls ``iter()`` eagerly when an epoch ends; the sampler is read only at the first
    ``next()``, which DALI issues after the next ``reset()``.
    """

    def __init__(self, owner: "DaliLoader"):
        # A weak reference: a loader <-> feeder cycle would leave dead DALI pipelines to the
        # cyclic garbage collector, which may then run their destructors in a forked child
        # (a DataLoader or FFCV writer worker), where DALI's threads do not exist: it hangs.
        self.owner = weakref.ref(owner)
        self.recent = collections.deque(maxlen=8)  # item ids of the last batches, for blame

    def __iter__(self):
        return self._batches()

    def _batches(self):
        o = self.owner()
        if o is None:
            return
        keys = [k[0] if isinstance(k, tuple) else k for k in iter(o.sampler)]
        start, token = o.resume_from, o.token
        bs = o.batch_size
        batches = [keys[b:b + bs] for b in range(start * bs, len(keys), bs)]
        if o.flat.kind == "array":       # in memory: nothing to wait for
            ahead = ((items, [o.read(i) for i in items]) for items in batches)
        else:   # 8+ reads in flight: 10 ms reads cost ~20 ms per batch of 16, not 160
            ahead = read_ahead(o.read, batches, depth=o.prefetch, threads=max(8, o.threads))
        for items, read in ahead:
            if o.token != token:   # the epoch was abandoned: stop feeding
                ahead.close()
                return
            self.recent.append(items)
            data, labels, index, bad = [], [], [], []
            for i, (arr, why) in zip(items, read):
                if why is not None:
                    bad.append(f"{o.flat.describe(i)}: {why}")
                    continue
                data.append(arr)
                labels.append(o.label_arrays[i])
                index.append(np.array([i], dtype=np.int64))
            if bad:
                if o.on_bad_image == "fail":
                    raise DataError(f"bad image: {bad[0]}; fix or remove it, or set "
                                    f"data.on_bad_image: skip")
                note_skips(o, bad)
                if not data:
                    raise DataError(f"every image of a batch is unreadable (first: {bad[0]})")
            yield data, labels, index


def read_ahead(read, batches, depth: int, threads: int):
    """(items, [read(i) for i in items]) per batch, with the reads of up to `depth` batches
    ahead running in a thread pool: DALI calls a (non-parallel) external source on the
    training thread, and reading files (np.fromfile, marker checks) on Lustre/NFS takes
    10-100+ ms per batch. The reads release the GIL; the pool lives for one epoch."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="dali-read") as pool:
        pending = collections.deque()
        todo = iter(batches)

        def submit():
            items = next(todo, None)
            if items is not None:
                pending.append((items, [pool.submit(read, i) for i in items]))

        for _ in range(max(1, depth)):
            submit()
        try:
            while pending:
                items, futures = pending.popleft()
                submit()
                yield items, [f.result() for f in futures]
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()


class DaliLoader:
    """Batches ``(images, labels)`` from a DALI pipeline fed by our sampler."""

    def __init__(self, dataset, sampler, batch_size: int, spec: AugmentSpec, *, seed: int = 0,
                 threads: int = 2, device_id: int | None = None, on_bad_image: str = "fail",
                 prefetch: int = 2):
        self.sampler, self.batch_size, self.spec = sampler, int(batch_size), spec
        self.flat = flatten_source(dataset.source)
        self.label_arrays = [np.array([v], dtype=np.int64) for v in self.flat.labels.tolist()]
        self.threads, self.device_id, self.on_bad_image = int(threads), device_id, on_bad_image
        self.prefetch, self.seed = int(prefetch), int(seed)
        self.skipped = 0
        self.batch_indices = None   # dataset indices of the batch last yielded
        self.blacklist: dict = {}   # item -> reason, found bad after DALI failed on it
        self.token = 0
        self.resume_from = 0        # first batch (of the sampler's epoch share) to feed
        self._fixed_size = None
        if self.flat.kind == "array":
            self._fixed_size = tuple(self.flat.base.images.shape[1:3])
        self._build()

    # ------------------------------------------------------------------ input
    def read(self, i: int):
        """(array for DALI, None) or (None, why the image is bad)."""
        if i in self.blacklist:
            return None, self.blacklist[i]
        kind = self.flat.kind
        if kind == "array":
            return self.flat.array(i), None
        if kind == "generic":
            try:
                return self.flat.load_hwc(i), None
            except DataError as exc:
                return None, str(exc)
        path = self.flat.path(i)
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            return None, "image file not found"
        except OSError as exc:
            return None, f"cannot read file: {exc}"
        why = check_encoded(data, path)
        return (None, why) if why else (data, None)

    # ------------------------------------------------------------------ pipeline
    def _build(self):
        self.feeder = _Feeder(self)
        gpu = self.device_id is not None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.threads),
                        device_id=self.device_id, seed=mix_seeds(self.seed, 0xDA11) % (2 ** 31),
                        prefetch_queue_depth=self.prefetch)
        with pipe:
            encoded = self.flat.kind == "files"
            raw, labels, index = fn.external_source(
                source=self.feeder, num_outputs=3, batch=True, cycle="raise",
                dtype=[types.UINT8, types.INT64, types.INT64],
                layout=[None if encoded else "HWC", None, None])
            images = _graph(self.spec, raw, encoded, self._in_channels(), gpu, self._fixed_size)
            pipe.set_outputs(images, labels, index)
        pipe.build()
        self.pipe = pipe
        self.it = DALIGenericIterator([pipe], ["images", "labels", "indices"], auto_reset=False,
                                      prepare_first_batch=False)
        self._state = "fresh"   # fresh | running | ended

    def _in_channels(self) -> int:
        if self.flat.kind == "files":
            return 3
        if self.flat.kind == "array":
            return 1 if self.flat.base.images.ndim == 3 else int(self.flat.base.images.shape[3])
        return self.flat.channels

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size + (n % self.batch_size > 0)

    # ------------------------------------------------------------------ iteration
    def _restart(self, start_batch: int):
        """Point the pipeline at the sampler's current epoch from ``start_batch`` on."""
        if self._state == "running":       # an epoch was left early: cancel and drain
            self.token += 1
            for _ in self.it:
                pass
            self._state = "ended"
        self.resume_from = start_batch
        if self._state == "ended":
            self.it.reset()
        self._state = "running"

    def __iter__(self):
        if len(self.sampler) == 0:
            return
        self._restart(0)
        delivered = 0
        while True:
            try:
                out = next(self.it)[0]
            except StopIteration:
                self._state = "ended"
                return
            except DataError:
                self._state = "broken"
                self._rebuild_after_failure()
                raise
            except RuntimeError as exc:
                culprits = self._blame()
                if not culprits:
                    raise
                if self.on_bad_image == "fail":
                    self._rebuild_after_failure()
                    i, why = culprits[0]
                    raise DataError(f"DALI could not decode: {self.flat.describe(i)}: {why}; "
                                    f"fix or remove it, or set data.on_bad_image: skip") from exc
                for i, why in culprits:  # counted when the feeder meets them again
                    self.blacklist[i] = why
                log.warning("DALI failed on %d undecodable image(s) (first: %s); rebuilt the "
                            "pipeline without them", len(culprits), culprits[0][1])
                self._rebuild_after_failure()
                self._restart(delivered)       # continue the epoch where it broke
                continue
            delivered += 1
            self.batch_indices = out["indices"].view(-1)   # what the engine orders rows by
            yield out["images"], out["labels"].view(-1)

    def _rebuild_after_failure(self):
        """A DALI pipeline that raised cannot be reused; start a new one (same settings)."""
        try:
            del self.it, self.pipe
        finally:
            self._build()

    def _blame(self) -> list:
        """Images of the recent batches that PIL cannot decode: [(item, why)]."""
        if self.flat.kind != "files":
            return []
        found = []
        for items in list(self.feeder.recent):
            for i in items:
                if i in self.blacklist:
                    continue
                why = pil_problem(self.flat.path(i))
                if why:
                    found.append((i, why))
        return found


# ----------------------------------------------------------------------------- graph

def _uniform(lo, hi):
    return fn.random.uniform(range=[float(lo), float(hi)])


def _to_channels(img, have: int, want: int):
    if have == want:
        return img
    if have == 3 and want == 1:
        return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(img, img, img, axis=2)


def _normalize(img, spec: AugmentSpec, mirror=None, crop=None):
    kwargs = dict(dtype=types.FLOAT, output_layout="CHW",
                  mean=[m * 255.0 for m in spec.mean], std=[s * 255.0 for s in spec.std])
    if mirror is not None:
        kwargs["mirror"] = mirror
    if crop is not None:
        kwargs["crop"] = crop
    return fn.crop_mirror_normalize(img, **kwargs)


def _moco_view(img, spec: AugmentSpec):
    """RandomResizedCrop(0.2-1) -> ColorJitter(0.4,0.4,0.4,0.1) p=0.8 -> grayscale p=0.2 ->
    Gaussian blur p=0.5 -> flip -> normalize, as DALI operators. Probabilities become
    identity parameters (factor 1, saturation kept, sigma ~0) for the samples not drawn; the
    jitter order is fixed (brightness/contrast, then hue/saturation) instead of random."""
    s = spec.size
    v = fn.random_resized_crop(img, size=[s, s], random_area=list(MOCO["scale"]),
                               random_aspect_ratio=list(RRC_RATIO))
    b, c, sat, hue = MOCO["jitter"]
    on = fn.cast(fn.random.coin_flip(probability=MOCO["jitter_p"]), dtype=types.FLOAT)
    bright = 1.0 + on * (_uniform(max(0.0, 1 - b), 1 + b) - 1.0)
    contrast = 1.0 + on * (_uniform(max(0.0, 1 - c), 1 + c) - 1.0)
    saturation = 1.0 + on * (_uniform(max(0.0, 1 - sat), 1 + sat) - 1.0)
    hue_deg = on * _uniform(-hue * 360.0, hue * 360.0)
    gray = fn.color_space_conversion(v, image_type=types.RGB, output_type=types.GRAY)
    center = fn.reductions.mean(fn.cast(gray, dtype=types.FLOAT))
    if v.device == "gpu":
        center = center.cpu()
    v = fn.brightness_contrast(v, brightness=bright, contrast=contrast, contrast_center=center)
    keep_color = 1.0 - fn.cast(fn.random.coin_flip(probability=MOCO["gray_p"]),
                               dtype=types.FLOAT)
    v = fn.hsv(v, hue=hue_deg, saturation=saturation * keep_color)
    blur = fn.cast(fn.random.coin_flip(probability=MOCO["blur_p"]), dtype=types.FLOAT)
    sigma = blur * _uniform(*MOCO["blur_sigma"]) + (1.0 - blur) * 1e-3
    v = fn.gaussian_blur(v, window_size=moco_blur_kernel(s), sigma=sigma)
    v = _to_channels(v, 3, spec.channels)
    return _normalize(v, spec, mirror=fn.random.coin_flip())


def _graph(spec: AugmentSpec, raw, encoded: bool, in_channels: int, gpu: bool, fixed_size):
    """The augmentation recipe as DALI operators; returns the normalized NCHW (or 2-view) node."""
    s, kind = spec.size, spec.kind
    decode_dev = "mixed" if gpu else "cpu"
    rgb_needed = kind == "moco" and spec.train
    out_type = types.GRAY if (spec.channels == 1 and not rgb_needed) else types.RGB
    have = 1 if out_type == types.GRAY else 3

    if encoded and kind == "imagenet" and spec.train:
        # Decode only the random crop window, then resize: the fast path.
        img = fn.decoders.image_random_crop(raw, device=decode_dev, output_type=out_type,
                                            random_area=list(RRC_SCALE),
                                            random_aspect_ratio=list(RRC_RATIO),
                                            num_attempts=10)
        img = fn.resize(img, resize_x=s, resize_y=s)
        return _normalize(_to_channels(img, have, spec.channels), spec,
                          mirror=fn.random.coin_flip())
    if encoded:
        img = fn.decoders.image(raw, device=decode_dev, output_type=out_type)
    else:
        img = raw.gpu() if gpu else raw
        have = in_channels
        if rgb_needed and have == 1:
            img, have = fn.cat(img, img, img, axis=2), 3

    if kind == "moco" and spec.train:
        return fn.stack(_moco_view(img, spec), _moco_view(img, spec))
    if kind in ("imagenet", "moco"):
        if spec.train:  # imagenet, from arrays
            img = fn.random_resized_crop(img, size=[s, s], random_area=list(RRC_SCALE),
                                         random_aspect_ratio=list(RRC_RATIO))
            return _normalize(_to_channels(img, have, spec.channels), spec,
                              mirror=fn.random.coin_flip())
        img = fn.resize(img, resize_shorter=spec.eval_resize)
        return _normalize(_to_channels(img, have, spec.channels), spec, crop=[s, s])
    if kind == "small":
        img = _to_channels(img, have, spec.channels)
        if spec.train:
            pad = spec.pad
            hw = fn.cast(img.shape(), dtype=types.FLOAT)[0:2]
            u = fn.random.uniform(range=[0.0, 1.0], shape=[2])
            start = fn.cast(dmath.floor(u * (hw + float(2 * pad - s + 1))), dtype=types.INT32)
            img = fn.slice(img, start=start - pad, shape=[s, s], axes=[0, 1],
                           out_of_bounds_policy="pad")
            return _normalize(img, spec, mirror=fn.random.coin_flip())
        if fixed_size == (s, s):
            return _normalize(img, spec)
        return _normalize(img, spec, crop=[s, s])
    if kind == "none":
        return _normalize(_to_channels(img, have, spec.channels), spec)
    raise DataError(f"DALI loader: no recipe for data.augment = {kind!r}")
