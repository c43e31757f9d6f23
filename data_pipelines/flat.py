"""A dataset source reduced to its storage, shared by the loader backends.

Kept apart from loaders.py so that the backends (dali_loader.py, ffcv_*.py) import it without
importing loaders.py, which imports them on demand: no import cycle.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .sources import ArraySource, FileSource, base_indices

log = logging.getLogger("data_pipelines.loaders")


@dataclass
class FlatSource:
    """A dataset source reduced to its storage: files, an in-memory array, or anything else.

    ``index[i]`` is the storage index of dataset item ``i`` (LT subsets and index lists are
    views); backends read storage directly instead of calling ``source.load`` per item.
    """
    kind: str               # "files" | "array" | "generic"
    base: object
    index: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def describe(self, i: int) -> str:
        return self.base.describe(int(self.index[i]))

    def path(self, i: int) -> str:
        return self.base.full_path(int(self.index[i]))

    def array(self, i: int) -> np.ndarray:
        """HWC uint8 (a view: do not write)."""
        img = self.base.images[int(self.index[i])]
        return img[:, :, None] if img.ndim == 2 else img

    def load_hwc(self, i: int) -> np.ndarray:
        """Any source's item as an HWC uint8 array (the slow, generic path)."""
        img = self.base.load(int(self.index[i]))
        if isinstance(img, torch.Tensor):
            return np.ascontiguousarray(img.as_subclass(torch.Tensor).permute(1, 2, 0).numpy())
        arr = np.asarray(img)
        return arr[:, :, None] if arr.ndim == 2 else arr

    @property
    def channels(self) -> int:
        return int(getattr(self.base, "in_channels", 3))


def flatten_source(src) -> FlatSource:
    labels = np.asarray(src.labels, dtype=np.int64)  # the outer labels: a subset may relabel
    src, index = base_indices(src)
    if isinstance(src, FileSource):
        kind = "files"
    elif isinstance(src, ArraySource):
        kind = "array"
    else:
        kind = "generic"
    return FlatSource(kind, src, np.asarray(index, dtype=np.int64), labels)


def note_skips(counter_owner, messages) -> None:
    """Shared logging of skipped images for the accelerated backends."""
    for msg in messages:
        counter_owner.skipped += 1
        log.warning("skipped bad image (data.on_bad_image=skip, %d so far): %s",
                    counter_owner.skipped, msg)
