"""Labeled image sources behind one small interface: the in-memory kinds (arrays, files,
precomputed tensors, subsets, concatenations) and DataError. Formats on disk are read
into them by readers.py; data.source picks one in sources.py.

Every source offers ``len(src)``, ``src.labels`` (int64 array), ``src.num_classes``,
``src.load(i)`` (one image), ``src.describe(i)`` (a path or ``name[index]`` for error
messages), ``src.in_channels`` and ``src.name``.  Keeping the interface this small lets the
long-tail subsetting, the samplers and the datasets work the same on in-memory arrays
(CIFAR, SVHN, Fashion-MNIST) and on list files of image paths (ImageNet-LT, iNaturalist).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np


class DataError(ValueError):
    """Bad or missing input data; the message names the file (and line) at fault."""


def _check_labels(labels, num_classes: Optional[int], where: str) -> tuple[np.ndarray, int]:
    """Turn labels into int64 and make sure they lie in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{where}: expected a 1-D label array, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: expected integer labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: expected labels >= 0, found {int(labels.min())}")
    top = int(labels.max()) + 1 if labels.size else 0
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise DataError(f"{where}: expected labels < num_classes={num_classes}, "
                        f"found {top - 1}")
    return labels, int(num_classes)


class ArraySource:
    """Images held in one uint8 array; ``load`` returns a CHW uint8 tensor (no PIL round trip)."""

    def __init__(self, images: np.ndarray, labels, num_classes: Optional[int], name: str):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"{name}: expected uint8 images shaped [N,H,W] or [N,H,W,C], "
                            f"got dtype {images.dtype} shape {images.shape}")
        self.labels, self.num_classes = _check_labels(labels, num_classes, name)
        if len(self.labels) != len(images):
            raise DataError(f"{name}: expected one label per image, got {len(images)} images "
                            f"and {len(self.labels)} labels")
        self.images = images
        self.name = name
        self.in_channels = 1 if images.ndim == 3 else int(images.shape[3])

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> "torch.Tensor":
        import torch  # imported here so list tools need not pay torch's import time

        img = torch.from_numpy(np.array(self.images[i]))  # a copy: transforms may write
        if img.ndim == 2:
            return img.unsqueeze(0)
        return img.permute(2, 0, 1).contiguous()

    def describe(self, i: int) -> str:
        return f"{self.name}[{int(i)}]"


class FileSource:
    """Images stored as files under ``root``; ``load`` opens one with PIL as RGB.

    ``origin`` says where each path came from (e.g. ``"train.txt:12"``): either one string per
    image, or a single string for all of them, or None.
    """

    def __init__(self, root: str, paths: Sequence[str], labels, num_classes: Optional[int],
                 name: str, origin: Union[Sequence[str], str, None] = None):
        self.root = root
        self.paths = list(paths)
        self.labels, self.num_classes = _check_labels(labels, num_classes, name)
        if len(self.labels) != len(self.paths):
            raise DataError(f"{name}: expected one label per path, got {len(self.paths)} paths "
                            f"and {len(self.labels)} labels")
        if origin is not None and not isinstance(origin, str) and len(origin) != len(self.paths):
            raise DataError(f"{name}: expected one origin per path, got {len(origin)}")
        self.origin = origin
        self.name = name
        self.in_channels = 3

    def __len__(self) -> int:
        return len(self.paths)

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i]) if self.root else self.paths[i]

    def origin_of(self, i: int) -> str:
        if self.origin is None:
            return self.name
        return self.origin if isinstance(self.origin, str) else self.origin[i]

    def load(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path = self.full_path(i)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found (listed at {self.origin_of(i)}); "
                            f"expected it under root {self.root!r}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image (listed at {self.origin_of(i)}): "
                            f"{exc}; expected a readable image file") from exc

    def describe(self, i: int) -> str:
        return f"{self.full_path(i)} ({self.origin_of(i)})"


class TensorSource:
    """Precomputed inputs (e.g. frozen-backbone features for cRT) behind the source interface."""

    def __init__(self, tensor, labels, num_classes: int, name: str = "features"):
        self.tensor = tensor
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.name = name
        self.in_channels = 0

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        return self.tensor[i]

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"


class SubsetSource:
    """A view of some items of another source, in the given order (e.g. a long-tailed subset).

    ``labels`` / ``num_classes`` replace the source's own, e.g. for a task of a few of its
    classes relabeled 0..k-1, or an unlabeled pool that trains on pseudo-labels."""

    def __init__(self, source, indices, labels=None, num_classes: Optional[int] = None):
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"{source.name}: expected a 1-D integer index array for a subset, "
                            f"got dtype {idx.dtype} shape {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= len(source)):
            raise DataError(f"{source.name}: subset indices must lie in [0, {len(source)}), "
                            f"got range [{int(idx.min())}, {int(idx.max())}]")
        self.base = source
        self.indices = idx
        if labels is None:
            self.labels = source.labels[idx]
        else:
            self.labels = np.asarray(labels, dtype=np.int64)
            if self.labels.shape != idx.shape:
                raise DataError(f"{source.name}: expected one label per subset item, got "
                                f"{self.labels.shape[0]} labels for {idx.size} items")
        self.num_classes = source.num_classes if num_classes is None else int(num_classes)
        self.in_channels = source.in_channels
        self.name = source.name

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int):
        return self.base.load(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.base.describe(int(self.indices[i]))


def base_indices(src) -> tuple:
    """(innermost source, its indices of ``src``'s items) through any chain of subsets."""
    index = None
    while isinstance(src, SubsetSource):
        index = src.indices if index is None else src.indices[index]
        src = src.base
    if index is None:
        index = np.arange(len(src), dtype=np.int64)
    return src, np.asarray(index, dtype=np.int64)


def select_classes(source, classes: Sequence[int]) -> SubsetSource:
    """The items of ``classes`` only, relabeled 0..k-1 in the given order (a k-class task)."""
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < source.num_classes]
    if bad or len(set(classes)) != len(classes) or not classes:
        raise DataError(f"data.classes = {classes}: expected distinct class ids of "
                        f"{source.name} in [0, {source.num_classes})")
    mapping = np.full(source.num_classes, -1, dtype=np.int64)
    mapping[classes] = np.arange(len(classes))
    relabeled = mapping[np.asarray(source.labels, dtype=np.int64)]
    keep = np.nonzero(relabeled >= 0)[0]
    return SubsetSource(source, keep, labels=relabeled[keep], num_classes=len(classes))


class ConcatSource:
    """Several sources one after another (e.g. an unlabeled pool with a part drawn from another
    data set); ``labels`` and ``num_classes`` are given, since the parts' label spaces differ."""

    def __init__(self, sources: Sequence, labels, num_classes: int, name: str = "concat"):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != self.offsets[-1]:
            raise DataError(f"{name}: expected {self.offsets[-1]} labels, got {len(self.labels)}")
        self.num_classes = int(num_classes)
        self.in_channels = max(int(getattr(s, "in_channels", 3)) for s in self.sources)
        self.name = name

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple:
        part = int(np.searchsorted(self.offsets, int(i), side="right")) - 1
        return self.sources[part], int(i) - int(self.offsets[part])

    def load(self, i: int):
        src, j = self._locate(i)
        return src.load(j)

    def describe(self, i: int) -> str:
        src, j = self._locate(i)
        return src.describe(j)
