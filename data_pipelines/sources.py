"""Labeled image sources behind one small interface.

Every source offers ``len(src)``, ``src.labels`` (int64 array), ``src.num_classes``,
``src.load(i)`` (one image), ``src.describe(i)`` (a path or ``name[index]`` for error
messages), ``src.in_channels`` and ``src.name``.  Keeping the interface this small lets the
long-tail subsetting, the samplers and the datasets work the same on in-memory arrays
(CIFAR, SVHN, Fashion-MNIST) and on list files of image paths (ImageNet-LT, iNaturalist).

This module is the `data.source` registry (each kind, the keys it reads, its rule) and
open_source; the source kinds live in source_types.py, the readers of each format in
readers.py (both re-exported here, where the rest of the code imports them from).
"""

from __future__ import annotations

import os
from typing import Optional

from ltrainer.configspec import F, Registry

from .readers import (FASHION_MNIST_ROOT, IMAGE_EXTENSIONS, INDEX_LIST_FORMAT,  # noqa: F401
                      read_cifar, read_fashion_mnist, read_image_folder, read_index_list,
                      read_list_file, read_svhn)
from .source_types import (ArraySource, ConcatSource, DataError, FileSource,  # noqa: F401
                           SubsetSource, TensorSource, base_indices, select_classes)


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
