"""Formats on disk -> sources (source_types.py): "path label" and "index label" list
files, image folders, CIFAR's python batches, SVHN's .mat files, Fashion-MNIST's idx
files. Each refusal is a DataError naming the file (and line)."""

from __future__ import annotations

import gzip
import os
import pickle  # only for CIFAR's python batches, which are distributed as pickles
import struct
from typing import Optional

import numpy as np

from .list_format import LIST_FORMAT, parse_list
from .source_types import ArraySource, DataError, FileSource, SubsetSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp", ".gif")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
INDEX_LIST_FORMAT = "'index label' (both non-negative integers)"


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
