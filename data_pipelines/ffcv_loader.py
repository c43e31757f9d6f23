"""FFCV backend: .beton files written from our sources, read in OUR sampler's order.

Why FFCV: it decodes and augments whole batches in numba-compiled code over a memory-mapped
file, several times faster than PIL + torchvision on a few CPU cores.

- Files: writing and naming .beton files is ffcv_beton.py (re-exported here), the numba
  kernels and FFCV operations ffcv_ops.py; this module reads.
- Order: a custom TraversalOrder hands FFCV ``our sampler``'s indices for the current
  (epoch, start_batch, rank), so class-aware / cb / sqrt sampling and DDP sharding are the
  torchvision ones. FFCV's own shuffling and `distributed` flag are not used.
- Augmentation: FFCV's random-resized-crop / center-crop decoders, plus ffcv_ops.py's
  operations for what FFCV lacks. On a GPU machine the pipeline stops at uint8 and the batch
  is normalized on the GPU (4x less to copy, no CPU time). FFCV's random draws are not seeded
  per sample, so mid-epoch resume repeats the order but not the pixels.
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
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   SimpleRGBImageDecoder)
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.traversal_order.base import TraversalOrder

from .augment import MOCO, RRC_RATIO, RRC_SCALE, AugmentSpec
from .ffcv_beton import (beton_path_for, dataset_fingerprint, ensure_beton,  # noqa: F401
                         read_sidecar, sidecar_path, write_beton)
from .ffcv_ops import CenterCrop, MocoColor, NormalizeCHW, PadCropFlip, RandomFlip
from .flat import flatten_source, note_skips
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
