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
- Augmentation: the same recipes with DALI operators (see `_graph`). Flips and the "small"
  crop are drawn from our per-sample seeds by the feeder (the "small" recipe is then pixel for
  pixel the torchvision backend's); MoCo's crop is DALI's, its colour jitter, grayscale, blur
  and flip run after DALI in batch_aug.py's shared stage (on the GPU with a GPU pipeline),
  seeded per sample too. Only the random-resized-crop windows are DALI's own draws (seeded per
  rank), so a resumed epoch repeats the order, and every pixel but those windows.

This is the only module that imports nvidia.dali (loaders.py imports it on demand).
"""
from __future__ import annotations

import collections
import logging
import weakref

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .augment import MOCO, RRC_RATIO, RRC_SCALE, AugmentSpec
from .batch_aug import BatchAugment, small_crop_params, uniforms
from .flat import flatten_source, note_skips
from .samplers import mix_seeds, sample_seeds
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
        keys, seeds = o.epoch_keys()
        start, token = o.resume_from, o.token
        bs = o.batch_size
        batches = [keys[b:b + bs] for b in range(start * bs, len(keys), bs)]
        seed_batches = iter([seeds[b:b + bs] for b in range(start * bs, len(keys), bs)])
        if o.flat.kind == "array":       # in memory: nothing to wait for
            ahead = ((items, [o.read(i) for i in items]) for items in batches)
        else:   # 8+ reads in flight: 10 ms reads cost ~20 ms per batch of 16, not 160
            ahead = read_ahead(o.read, batches, depth=o.prefetch, threads=max(8, o.threads))
        for items, read in ahead:
            if o.token != token:   # the epoch was abandoned: stop feeding
                ahead.close()
                return
            self.recent.append(items)
            data, labels, index, good_seeds, bad = [], [], [], [], []
            for i, seed, (arr, why) in zip(items, next(seed_batches), read):
                if why is not None:
                    bad.append(f"{o.flat.describe(i)}: {why}")
                    continue
                data.append(arr)
                labels.append(o.label_arrays[i])
                index.append(np.array([i], dtype=np.int64))
                good_seeds.append(seed)
            if bad:
                if o.on_bad_image == "fail":
                    raise DataError(f"bad image: {bad[0]}; fix or remove it, or set "
                                    f"data.on_bad_image: skip")
                note_skips(o, bad)
                if not data:
                    raise DataError(f"every image of a batch is unreadable (first: {bad[0]})")
            yield (data, labels, index, *o.draws(np.asarray(good_seeds, dtype=np.int64), data))


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
        self.epochs_seen = 0
        # The seeded parts DALI cannot draw per sample itself: flips and the "small" crop come
        # from the feeder (drawn from our per-sample seeds), MoCo's colour, blur and flip run
        # after DALI in batch_aug.py's shared stage.
        self.stage = BatchAugment(spec, flip=True) if spec.colour else None
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

    def epoch_keys(self):
        """(items, per-sample seeds) of the sampler's current epoch share; a sampler without
        seeds gets seeds from (loader seed, epoch, position)."""
        keys = list(iter(self.sampler))
        items = [k[0] if isinstance(k, tuple) else k for k in keys]
        if keys and isinstance(keys[0], tuple):
            seeds = np.asarray([k[1] for k in keys], dtype=np.int64)
        else:
            seeds = sample_seeds(self.seed, self.epochs_seen, np.arange(len(keys)))
        self.epochs_seen += 1
        return items, seeds

    @property
    def draw_kinds(self) -> tuple:
        """Which seeded per-sample inputs the graph takes (see `draws`)."""
        s = self.spec
        if s.colour:
            return ("seeds",)
        if s.kind == "small" and s.train:
            return ("mirror", "start")
        return ("mirror",) if s.flip else ()

    def draws(self, seeds: np.ndarray, data: list) -> list:
        """The per-sample inputs that carry our seeds into the graph: seeds (for the shared
        stage), mirror flags, the "small" crop's corner (in unpadded coordinates)."""
        s, kinds = self.spec, self.draw_kinds
        if "start" in kinds:
            p = [small_crop_params(int(v), a.shape[0], a.shape[1], s.size, s.pad)
                 for v, a in zip(seeds.tolist(), data)]
            return [[np.array(f, np.int32) for _, _, f in p],
                    [np.array([t - s.pad, left - s.pad], np.int32) for t, left, _ in p]]
        if "mirror" in kinds:
            flips = (uniforms(seeds, 13)[:, 12] < s.flip_p).tolist() if len(seeds) else []
            return [[np.array(f, np.int32) for f in flips]]
        if "seeds" in kinds:
            return [[np.array([v], np.int64) for v in seeds.tolist()]]
        return []

    # ------------------------------------------------------------------ pipeline
    def _build(self):
        self.feeder = _Feeder(self)
        gpu = self.device_id is not None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, self.threads),
                        device_id=self.device_id, seed=mix_seeds(self.seed, 0xDA11) % (2 ** 31),
                        prefetch_queue_depth=self.prefetch)
        with pipe:
            encoded = self.flat.kind == "files"
            kinds = self.draw_kinds
            types_of = {"seeds": types.INT64, "mirror": types.INT32, "start": types.INT32}
            raw, labels, index, *drawn = fn.external_source(
                source=self.feeder, num_outputs=3 + len(kinds), batch=True, cycle="raise",
                dtype=[types.UINT8, types.INT64, types.INT64] + [types_of[k] for k in kinds],
                layout=[None if encoded else "HWC"] + [None] * (2 + len(kinds)))
            drawn = dict(zip(kinds, drawn))
            images = _graph(self.spec, raw, encoded, self._in_channels(), gpu, self._fixed_size,
                            drawn.get("mirror"), drawn.get("start"))
            pipe.set_outputs(images, labels, index, *([drawn["seeds"]] if "seeds" in drawn else []))
        pipe.build()
        self.pipe = pipe
        self.it = DALIGenericIterator([pipe], ["images", "labels", "indices"] + (
            ["seeds"] if "seeds" in kinds else []), auto_reset=False, prepare_first_batch=False)
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
            x = out["images"]
            if self.stage is not None:   # MoCo: uint8 views -> colour, blur, flip, normalise
                x = self.stage(x, out["seeds"].view(-1).cpu().numpy())
            yield x, out["labels"].view(-1)

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
    """MoCo v2 aug+'s RandomResizedCrop(0.2-1) as uint8 CHW: the colour, blur, flip and
    normalisation run after DALI in batch_aug.py's shared stage (seeded per sample)."""
    s = spec.size
    v = fn.random_resized_crop(img, size=[s, s], random_area=list(MOCO["scale"]),
                               random_aspect_ratio=list(RRC_RATIO))
    return fn.transpose(v, perm=[2, 0, 1], output_layout="CHW")


def _graph(spec: AugmentSpec, raw, encoded: bool, in_channels: int, gpu: bool, fixed_size,
           mirror, start):
    """The augmentation recipe as DALI operators; returns the normalized NCHW (or 2-view)
    node (uint8 views for MoCo). ``mirror`` / ``start``: the seeded flips and "small" crop
    corners from the feeder."""
    s, kind = spec.size, spec.kind
    decode_dev = "mixed" if gpu else "cpu"
    out_type = types.GRAY if spec.channels == 1 else types.RGB
    have = 1 if out_type == types.GRAY else 3

    if encoded and kind == "imagenet" and spec.train:
        # Decode only the random crop window, then resize: the fast path.
        img = fn.decoders.image_random_crop(raw, device=decode_dev, output_type=out_type,
                                            random_area=list(RRC_SCALE),
                                            random_aspect_ratio=list(RRC_RATIO),
                                            num_attempts=10)
        img = fn.resize(img, resize_x=s, resize_y=s)
        return _normalize(_to_channels(img, have, spec.channels), spec, mirror=mirror)
    if encoded:
        img = fn.decoders.image(raw, device=decode_dev, output_type=out_type)
    else:
        img = raw.gpu() if gpu else raw
        have = in_channels

    if kind == "moco" and spec.train:
        return fn.stack(_moco_view(img, spec), _moco_view(img, spec))
    if kind in ("imagenet", "moco"):
        if spec.train:  # imagenet, from arrays
            img = fn.random_resized_crop(img, size=[s, s], random_area=list(RRC_SCALE),
                                         random_aspect_ratio=list(RRC_RATIO))
            return _normalize(_to_channels(img, have, spec.channels), spec, mirror=mirror)
        img = fn.resize(img, resize_shorter=spec.eval_resize)
        return _normalize(_to_channels(img, have, spec.channels), spec, crop=[s, s])
    if kind == "small":
        img = _to_channels(img, have, spec.channels)
        if spec.train:   # the corner and flip of batch_aug.small_crop_params (seeded)
            img = fn.slice(img, start=start, shape=[s, s], axes=[0, 1],
                           out_of_bounds_policy="pad")
            return _normalize(img, spec, mirror=mirror)
        if fixed_size == (s, s):
            return _normalize(img, spec)
        return _normalize(img, spec, crop=[s, s])
    if kind == "none":
        return _normalize(_to_channels(img, have, spec.channels), spec)
    raise DataError(f"DALI loader: no recipe for data.augment = {kind!r}")
