"""Labeled image sources behind one small interface.

Every source offers ``len(src)``, ``src.labels`` (int64 array), ``src.num_classes``,
``src.load(i)`` (one image), ``src.describe(i)`` (a path or ``name[index]`` for error
messages), ``src.in_channels`` and ``src.name``.  Keeping the interface this small lets the
long-tail subsetting, the samplers and the datasets work the same on in-memory arrays
(CIFAR, SVHN, Fashion-MNIST) and on list files of image paths (ImageNet-LT, iNaturalist).
"""

from __future__ import annotations

import gzip
import os
import pickle  # only for CIFAR's python batches, which are distributed as pickles
import struct
from typing import Optional, Sequence, Union

import numpy as np

from configspec import F, Registry

from .list_format import LIST_FORMAT, parse_list

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp", ".gif")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
INDEX_LIST_FORMAT = "'index label' (both non-negative integers)"


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


# ----------------------------------------------------------------------------- list files

def _read_text_lines(list_path: str) -> list[str]:
    if not os.path.isfile(list_path):
        raise DataError(f"{list_path}: list file not found; expected a text file with one "
                        f"{LIST_FORMAT} per line")
    try:
        with open(list_path, "r", encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{list_path}: not UTF-8 text ({exc}); expected one {LIST_FORMAT} "
                        f"per line") from exc


def _parse_label(text: str, where: str, expected: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{where}: label {text!r} is not an integer; expected {expected}") \
            from None
    if label < 0:
        raise DataError(f"{where}: label {label} is negative; expected {expected}")
    return label


def read_list_file(list_path: str, root: Optional[str] = None,
                   num_classes: Optional[int] = None, check_files: bool = False,
                   name: Optional[str] = None) -> FileSource:
    """Read a "relative/path label" list (classifier-balancing's ImageNet-LT / iNat format).

    The label is the text after the LAST whitespace, so paths may contain spaces. ``root``
    defaults to the list file's folder. ``check_files`` stats every image up front so a
    missing file fails now instead of hours into training.
    """
    if root is None:
        root = os.path.dirname(os.path.abspath(list_path))
    parsed = parse_list(list_path)
    if parsed.problems:
        raise DataError(parsed.problems[0])
    paths, labels, origin = parsed.paths, parsed.labels, parsed.origins
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        i = int(np.argmax(labels >= num_classes))
        raise DataError(f"{origin[i]}: label {int(labels[i])} out of range; expected "
                        f"0 <= label < {num_classes}")
    if check_files:
        missing = [(origin[i], os.path.join(root, p)) for i, p in enumerate(paths)
                   if not os.path.isfile(os.path.join(root, p))]
        if missing:
            shown = "; ".join(f"{o}: {p}" for o, p in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise DataError(f"{list_path}: {len(missing)} listed image(s) missing under root "
                            f"{root!r}: {shown}{more}")
    name = name or os.path.splitext(os.path.basename(list_path))[0]
    return FileSource(root, paths, labels, num_classes, name, origin)


def read_index_list(list_path: str, source) -> SubsetSource:
    """Read an "index label" list (written by tools/make_lt_lists.py for array sources).

    Array sources have no file paths, so their long-tailed subsets are stored as indices into
    the full split. Lines starting with '#' are comments. Each label must equal the source's
    label at that index, which catches a list applied to the wrong split or dataset.
    """
    indices = []
    for lineno, raw in enumerate(_read_text_lines(list_path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_path}:{lineno}"
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{where}: malformed line {raw!r}; expected {INDEX_LIST_FORMAT}")
        try:
            index = int(parts[0])
        except ValueError:
            raise DataError(f"{where}: index {parts[0]!r} is not an integer; expected "
                            f"{INDEX_LIST_FORMAT}") from None
        label = _parse_label(parts[1], where, INDEX_LIST_FORMAT)
        if not 0 <= index < len(source):
            raise DataError(f"{where}: index {index} out of range; expected 0 <= index < "
                            f"{len(source)} for source {source.name}")
        if int(source.labels[index]) != label:
            raise DataError(f"{where}: label {label} does not match {source.describe(index)} "
                            f"whose label is {int(source.labels[index])}; expected the list "
                            f"to be made from this dataset and split")
        indices.append(index)
    if not indices:
        raise DataError(f"{list_path}: no entries; expected one {INDEX_LIST_FORMAT} per line")
    return SubsetSource(source, np.asarray(indices, dtype=np.int64))


def read_image_folder(root: str, name: Optional[str] = None) -> FileSource:
    """Read ``root/<class>/**/<image>``; sorted class folder names give labels 0..C-1."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: image folder not found; expected root/<class>/<image> files")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise DataError(f"{root}: no class sub-folders; expected root/<class>/<image> files")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.relpath(os.path.join(dirpath, fn), root))
                    labels.append(label)
    if not paths:
        raise DataError(f"{root}: no image files (extensions {', '.join(IMAGE_EXTENSIONS)}) "
                        f"found in its class sub-folders")
    src = FileSource(root, paths, np.asarray(labels, dtype=np.int64), len(classes),
                     name or os.path.basename(os.path.normpath(root)),
                     origin=f"image folder {root}")
    src.classes = classes
    return src


# ----------------------------------------------------------------------------- array datasets

def _unpickle_cifar(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"{path}: CIFAR batch file not found; expected the python version "
                        f"as distributed (cifar-10-batches-py/ or cifar-100-python/) under "
                        f"data.root")
    try:
        with open(path, "rb") as f:
            # CIFAR's python batches are pickles by distribution; we never write pickles.
            return pickle.load(f, encoding="bytes")
    except Exception as exc:  # a truncated or foreign file can raise many kinds of error
        raise DataError(f"{path}: cannot read CIFAR batch ({exc}); expected the python "
                        f"pickle batch as distributed") from exc


def read_cifar(root: str, name: str = "cifar10", train: bool = True) -> ArraySource:
    """Read CIFAR-10/100 from the python batches (CIFAR-100 uses the 100 fine labels)."""
    if name == "cifar10":
        folder, files = "cifar-10-batches-py", (
            [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"])
        label_key, num_classes = b"labels", 10
    elif name == "cifar100":
        folder, files = "cifar-100-python", ["train" if train else "test"]
        label_key, num_classes = b"fine_labels", 100
    else:
        raise DataError(f"read_cifar: unknown name {name!r}; expected 'cifar10' or 'cifar100'")
    base = root if os.path.basename(os.path.normpath(root)) == folder else \
        os.path.join(root, folder)
    images, labels = [], []
    for fn in files:
        path = os.path.join(base, fn)
        batch = _unpickle_cifar(path)
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{path}: expected keys b'data' and {label_key!r} in the CIFAR "
                            f"batch, found {sorted(batch)}")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: expected data shaped [N, 3072], got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
        if len(labels[-1]) != len(data):
            raise DataError(f"{path}: expected {len(data)} labels, got {len(labels[-1])}")
    return ArraySource(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
                       num_classes, name)


def read_svhn(root: str, split: str = "train") -> ArraySource:
    """Read SVHN's ``{split}_32x32.mat``; digit 0 is stored as label 10 and becomes 0."""
    if split not in ("train", "test", "extra"):
        raise DataError(f"read_svhn: unknown split {split!r}; expected train, test or extra")
    path = os.path.join(root, f"{split}_32x32.mat")
    if not os.path.isfile(path):
        raise DataError(f"{path}: SVHN file not found; expected {split}_32x32.mat "
                        f"(cropped digits format) under data.root")
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several types for a bad file
        raise DataError(f"{path}: cannot read .mat file ({exc}); expected SVHN's "
                        f"{split}_32x32.mat") from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y'")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: expected X shaped [H, W, 3, N], got {x.shape}")
    y = np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    y[y == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2).astype(np.uint8, copy=False))
    return ArraySource(images, y, 10, "svhn")


def _open_maybe_gz(path: str):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _read_idx(path: str, expected_magic: int, ndim: int) -> np.ndarray:
    try:
        with _open_maybe_gz(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: file too short for an IDX header")
    magic = struct.unpack(">i", data[:4])[0]
    if magic != expected_magic:
        raise DataError(f"{path}: bad IDX magic number {magic}; expected {expected_magic}")
    dims = struct.unpack(">" + "i" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says shape {dims} ({int(np.prod(dims))} bytes) "
                        f"but the file holds {body.size} bytes of data")
    return body.reshape(dims).copy()  # frombuffer views are read-only


def read_fashion_mnist(root: str = FASHION_MNIST_ROOT, train: bool = True) -> ArraySource:
    """Read Fashion-MNIST IDX files (gzipped or not) as 28x28 single-channel images."""
    prefix = "train" if train else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        base = os.path.join(root, f"{prefix}-{kind}")
        for candidate in (base + ".gz", base):
            if os.path.isfile(candidate):
                found[kind] = candidate
                break
        else:
            raise DataError(f"{base}.gz: Fashion-MNIST file not found (nor uncompressed); "
                            f"run `apt-get install dataset-fashion-mnist` or set data.root "
                            f"to a folder holding {prefix}-{kind}[.gz]")
    images = _read_idx(found["images-idx3-ubyte"], 2051, 3)
    labels = _read_idx(found["labels-idx1-ubyte"], 2049, 1)
    if len(images) != len(labels):
        raise DataError(f"{found['labels-idx1-ubyte']}: expected {len(images)} labels to match "
                        f"{found['images-idx3-ubyte']}, got {len(labels)}")
    return ArraySource(images, labels.astype(np.int64), 10, "fashion_mnist")


# ----------------------------------------------------------------------------- dispatcher

def _check_lists(cfg, fail):
    for key in ("train_list", "test_list" if cfg.eval.split == "test" else "val_list"):
        if not cfg.data[key]:
            fail("data.source", f"data.source = 'list' needs data.{key} (a file of "
                                f"'relative/path label' lines)")
    _check_root(cfg, fail)


def _check_root(cfg, fail):
    if cfg.data.root is None:
        fail("data.source", f"data.source = '{cfg.data.source}' needs data.root")


# Every source reads these keys (the list keys: "path label" lists for `list`, optional
# "index label" subsets of an array data set's split); each source adds its own rule.
SOURCES = Registry("data.source", default="fashion_mnist", help="labeled data set",
                   config={"data": {
                       "root": F("str", None, nullable=True,
                                 help="data root; null = the source's default"),
                       "train_list": F("str", None, nullable=True),
                       "val_list": F("str", None, nullable=True),
                       "test_list": F("str", None, nullable=True),
                       "num_classes": F("int", None, nullable=True, ge=1,
                                        help="for list/folder sources"),
                   }})


def _array(read, splits=("train", "test")):
    """An array data set: its official `splits` (`read` opens one), optionally narrowed by an
    "index label" list."""
    def open_split(kind, root, split, list_file, num_classes):
        if root is None and kind != "fashion_mnist":
            raise DataError(f"open_source: kind {kind!r} needs data.root to be set")
        src = read(kind, root, split)
        return read_index_list(list_file, src) if list_file else src
    open_split.splits = splits     # what the config can be checked against
    return open_split


def _train_test(kind, split):
    if split not in ("train", "test"):
        raise DataError(f"open_source: {kind} has splits train/test, not {split!r}")
    return split == "train"


def _open_list(kind, root, split, list_file, num_classes):
    """A "path label" list per split (data.<split>_list)."""
    if not list_file:
        raise DataError(f"open_source: kind 'list' needs the {split} split's list file "
                        f"(data list_file setting)")
    return read_list_file(list_file, root, num_classes=num_classes)


def _open_folder(kind, root, split, list_file, num_classes):
    if root is None:
        raise DataError(f"open_source: kind {kind!r} needs data.root to be set")
    return read_image_folder(os.path.join(root, split), name=split)


SOURCES.add("fashion_mnist", _array(lambda kind, root, split: read_fashion_mnist(
    root or FASHION_MNIST_ROOT, train=_train_test(kind, split))))
for _kind in ("cifar10", "cifar100"):
    SOURCES.add(_kind, _array(lambda kind, root, split: read_cifar(
        root, kind, train=_train_test(kind, split))), check=_check_root)
SOURCES.add("svhn", _array(lambda kind, root, split: read_svhn(root, split),
                           ("train", "test", "extra")), check=_check_root)
_open_list.list_per_split = True
SOURCES.add("list", _open_list, check=_check_lists)
SOURCES.add("folder", _open_folder, check=_check_root)
SOURCE_KINDS = tuple(SOURCES)


def open_source(kind: str, root: Optional[str], split: str, list_file: Optional[str] = None,
                num_classes: Optional[int] = None):
    """Open the ``split`` of a dataset by kind.

    - "list": ``list_file`` is that split's "path label" list; ``root`` is the image root
      (default: the list file's folder).
    - "folder": images in ``root/<split>/<class>/``.
    - array kinds: the official split; if ``list_file`` is given it is an "index label" list
      (see ``read_index_list``) selecting a subset of that split, e.g. a long-tailed one.
    """
    if kind not in SOURCES:
        raise DataError(f"open_source: unknown kind {kind!r}; expected one of "
                        f"{', '.join(SOURCES)}")
    return SOURCES[kind](kind, root, split, list_file, num_classes)
