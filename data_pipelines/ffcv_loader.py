"""FFCV backend: .beton files written from our sources, read in OUR sampler's order.

Why FFCV: it decodes and augments whole batches in numba-compiled code over a memory-mapped
file, several times faster than PIL + torchvision on a few CPU cores.

- Files: writing and naming .beton files is ffcv_beton.py (re-exported here), the numba
  kernels and FFCV operations ffcv_ops.py; this module reads.
- Order: a custom TraversalOrder hands FFCV ``our sampler``'s indices for the current
  (epoch, start_batch, rank), so class-aware / cb / sqrt sampling and DDP sharding are the
  torchvision ones. FFCV's own shuffling and `distributed` flag are not used.
- Augmentation: FFCV's random-resized-crop / center-crop decoders and ffcv_ops.py's numba
  normalisation; the flip, the "small" pad-crop and MoCo's colour and blur run after FFCV in
  batch_aug.py's shared stage, drawn from our per-sample seeds (the "small" recipe is then
  pixel for pixel the torchvision backend's). On a GPU machine the pipeline stops at uint8 and
  the stage runs on the GPU (4x less to copy, no CPU time). The random-resized-crop window is
  seeded too (ffcv_ops.SeededRandomResizedCrop): the seed travels to the decoder inside the
  order's uint64 keys, above the item index, as FFCV passes a decoder nothing else per sample.
- Batches are views of FFCV's ring buffers, which are reused across epochs: valid until the
  next batch or two are taken (clone to keep them); the engine uses each batch before asking
  for the next.

Only this module, ffcv_beton.py and ffcv_ops.py import ffcv and numba (loaders.py imports
them on demand).
"""
from __future__ import annotations

import logging
import os
import queue

import numpy as np
import torch
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from .augment import MOCO, RRC_RATIO, RRC_SCALE, AugmentSpec
from .batch_aug import BatchAugment, flip_mask
from .ffcv_beton import (beton_path_for, dataset_fingerprint, ensure_beton,  # noqa: F401
                         read_sidecar, sidecar_path, write_beton)
from .ffcv_ops import CenterCrop, NormalizeCHW, SeededRandomResizedCrop, crop_keys, flip_in_place
from .flat import flatten_source, note_skips
from .samplers import sample_seeds
from .sources import DataError

log = logging.getLogger("data_pipelines.ffcv")

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


def sampler_keys(sampler) -> tuple:
    """The sampler's current epoch share: (uint64 item indices as FFCV wants them, int64
    per-sample seeds or None when the sampler gives none)."""
    keys = list(iter(sampler))
    idx = np.asarray([k[0] if isinstance(k, tuple) else k for k in keys], dtype=np.uint64)
    if keys and isinstance(keys[0], tuple):
        return idx, np.asarray([k[1] for k in keys], dtype=np.int64)
    return idx, None


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
        # After FFCV: the seeded parts of the recipe FFCV cannot seed (flip, "small" crop,
        # MoCo's colour and blur) and, for uint8 batches, the normalisation: batch_aug.py's
        # shared stage, on the training device when there is one.
        self.uint8_out = self.on_device or (spec.train and spec.kind in ("small", "moco"))
        self.stage = BatchAugment(spec, flip=True, crop=True, gray_rgb=self.stored_channels == 1)
        self._constants = self.stage._constants   # device -> normalisation tensors
        self.seed, self.epochs_seen = int(seed), 0
        self.seeded_crop = spec.train and spec.kind in ("imagenet", "moco")
        key = (os.path.abspath(path), os.path.getmtime(path), spec, int(batch_size),
               max(1, int(threads)), int(batches_ahead), str(self.device))
        if key not in _COMPILED:
            pipes = self._pipelines(int(image["width"].max()), int(image["height"].max()))
            loader = Loader(path, batch_size=batch_size, num_workers=key[4],
                            order=_GivenOrder(), pipelines=pipes, drop_last=False,
                            os_cache=True,   # the process cache reads pages by raw index
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

        def finish(flip: bool = False) -> list:
            """Normalize to float32 NCHW here (CPU), or hand over uint8 HWC to the shared
            stage (on the GPU: 4x less to copy, no CPU time). Flips are the stage's (seeded).

            To a device, FFCV's ToDevice copies in FFCV's own thread and stream, so the training
            thread never waits for a copy. The copy blocks that thread on purpose: FFCV refills
            a pinned host slot as soon as its batch is handed on, and an asynchronous copy could
            still be reading it (the device slots are guarded by FFCV's events)."""
            if self.on_device:
                return [ToTensor(), ToDevice(self.device, non_blocking=False)]
            if self.uint8_out:
                return [ToTensor()]
            return [NormalizeCHW(s.mean, s.std, s.channels, self.stored_channels), ToTensor()]

        off = {"label": None, "ok": None}
        if s.kind == "small":
            if s.train:
                ops = [SimpleRGBImageDecoder()]     # the seeded crop: in the shared stage
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
        items = len(self.flat)
        if s.kind == "imagenet":
            dec = SeededRandomResizedCrop((s.size, s.size), RRC_SCALE, RRC_RATIO, items)
            return {**off, "image": [dec] + finish(True)}

        def view(v):
            dec = SeededRandomResizedCrop((s.size, s.size), MOCO["scale"], RRC_RATIO, items, v)
            return PipelineSpec("image", decoder=dec, transforms=finish())

        return {**off, "image": None, "view0": view(0), "view1": view(1)}

    def _finish(self, views: list, seeds) -> torch.Tensor:
        """FFCV's outputs (one per view) -> the batch: uint8 HWC (already on the device when
        there is one) through the shared stage, or float32 NCHW (normalised by FFCV) with the
        seeded flip. The stage's output is a new tensor: FFCV's ring slot can be reused."""
        if not self.uint8_out:
            x = views[0]
            if self.spec.flip:
                rows = np.nonzero(flip_mask(seeds, self.spec.flip_p))[0].astype(np.int64)
                flip_in_place(x.numpy(), rows)
            return x
        x = torch.stack([v.permute(0, 3, 1, 2) for v in views], 1)
        return self.stage(x[:, 0] if len(views) == 1 else x, seeds)

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
        order, seeds = sampler_keys(self.sampler)
        if seeds is None and self.spec.train:      # a sampler without seeds: our own
            seeds = sample_seeds(self.seed, self.epochs_seen, np.arange(len(order)))
        self.epochs_seen += 1
        keys = order
        if self.seeded_crop:     # the crop seeds ride in the keys (SeededRandomResizedCrop)
            keys = crop_keys(order, seeds, len(self.flat))
        self.loader.traversal_order.order = keys
        self.loader.first_traversal_order = keys   # FFCV sizes the epoch from this
        if len(order) == 0:
            return
        self._epoch_it = it = iter(self.loader)
        bs = self.batch_size
        try:
            for b, out in enumerate(it):
                chunk = order[b * bs:(b + 1) * bs]
                y = self.labels[torch.from_numpy(chunk.astype(np.int64))]
                x = self._finish(list(out), None if seeds is None else seeds[b * bs:(b + 1) * bs])
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
