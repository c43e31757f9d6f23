"""NVIDIA DALI backend: our samplers feed DALI through external_source.

Why DALI: its decoders (libjpeg-turbo on CPU, nvJPEG on GPU with ``device='mixed'``) and
operators run in a native thread pool, and for the train crop it decodes only the crop region
(``decoders.image_slice``, in the window the feeder drew), which a loader that decodes whole
images cannot match.

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
- Augmentation: the same recipes with DALI operators (dali_graph.py). Every random draw comes
  from our per-sample seeds, drawn by the feeder: flips, the "small" crop (then pixel for pixel
  the torchvision backend's) and the random-resized-crop windows (batch_aug.rrc_params's, the
  torchvision MoCo path's windows for the same seed); MoCo's colour jitter, grayscale, blur and
  flip run after DALI in batch_aug.py's shared stage (on the GPU with a GPU pipeline). So a
  sample's pixels depend on its seed only: a resumed epoch repeats them.

This module and dali_graph.py are the only ones that import nvidia.dali (loaders.py imports
this one on demand).
"""
from __future__ import annotations

import collections
import logging
import weakref

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .augment import AugmentSpec
from .batch_aug import BatchAugment, small_crop_params, uniforms
from .dali_graph import crop_views, graph, image_size, window_draws
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
        sized = bool(crop_views(o.spec))    # crop windows need each image's size
        for items, read in ahead:
            if o.token != token:   # the epoch was abandoned: stop feeding
                ahead.close()
                return
            self.recent.append(items)
            data, sizes, labels, index, good_seeds, bad = [], [], [], [], [], []
            for i, seed, (arr, why) in zip(items, next(seed_batches), read):
                if why is None and sized:
                    hw, why = image_size(arr, o.flat.kind == "files")
                if why is not None:
                    bad.append(f"{o.flat.describe(i)}: {why}")
                    continue
                data.append(arr)
                if sized:
                    sizes.append(hw)
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
            yield (data, labels, index,
                   *o.draws(np.asarray(good_seeds, dtype=np.int64), data, sizes))


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
        # DALI cannot draw from our per-sample seeds itself: flips, the "small" crop and the
        # random-resized-crop windows come from the feeder, MoCo's colour, blur and flip run
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
        """Which seeded per-sample inputs the graph takes (see `draws`): then an anchor and a
        shape per random-resized-crop view."""
        s = self.spec
        windows = tuple(k for v, _ in crop_views(s) for k in (f"anchor{v}", f"shape{v}"))
        if s.colour:
            return ("seeds",) + windows
        if s.kind == "small" and s.train:
            return ("mirror", "start")
        return (("mirror",) if s.flip else ()) + windows

    def draws(self, seeds: np.ndarray, data: list, sizes: list = ()) -> list:
        """The per-sample inputs that carry our seeds into the graph: seeds (for the shared
        stage), mirror flags, the "small" crop's corner (in unpadded coordinates), the crop
        windows (dali_graph.window_draws, from the images' (height, width) ``sizes``)."""
        s, kinds = self.spec, self.draw_kinds
        if "start" in kinds:
            p = [small_crop_params(int(v), a.shape[0], a.shape[1], s.size, s.pad)
                 for v, a in zip(seeds.tolist(), data)]
            return [[np.array(f, np.int32) for _, _, f in p],
                    [np.array([t - s.pad, left - s.pad], np.int32) for t, left, _ in p]]
        out = []
        if "mirror" in kinds:
            flips = (uniforms(seeds, 13)[:, 12] < s.flip_p).tolist() if len(seeds) else []
            out.append([np.array(f, np.int32) for f in flips])
        if "seeds" in kinds:
            out.append([np.array([v], np.int64) for v in seeds.tolist()])
        return out + window_draws(s, seeds, sizes)

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
            raw, labels, index, *drawn = fn.external_source(
                source=self.feeder, num_outputs=3 + len(kinds), batch=True, cycle="raise",
                dtype=[types.UINT8, types.INT64, types.INT64] + [
                    types.INT64 if k == "seeds" else types.INT32 for k in kinds],
                layout=[None if encoded else "HWC"] + [None] * (2 + len(kinds)))
            drawn = dict(zip(kinds, drawn))
            windows = [(drawn[f"anchor{v}"], drawn[f"shape{v}"]) for v, _ in crop_views(self.spec)]
            images = graph(self.spec, raw, encoded, self._in_channels(), gpu, self._fixed_size,
                           drawn.get("mirror"), drawn.get("start"), windows)
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
