"""Feature-bank files: what a bank folder holds, writing one, and opening one with checks.

A bank is a folder::

    header.json    written last, so its presence means "complete"; says which checkpoint
                   (and its sha256), layer and dataset made the features, and the counts
    features.npy   (N, D) float16 or float32
    labels.npy     (N,) int64
    indices.npy    (N,) int64, the sample's index in the split it was read from
    paths.npy      (N,) unicode, the image file (or "name[index]" for array datasets)

No pickle anywhere: every array is a plain .npy and loads with allow_pickle=False.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np

from ..checkpoint import atomic_write, write_json_atomic
from ..extraction import ExtractionError, read_json
from ..validation import finite_floats, first_sentence, int_labels

FORMAT = "ltt-feature-bank"
VERSION = 1
HEADER = "header.json"
PARTIAL = ".partial"
ARRAYS = ("features", "labels", "indices", "paths")
REQUIRED_KEYS = ("format", "version", "count", "dim", "dtype", "num_classes")
DTYPES = ("float16", "float32")
BankError = ExtractionError   # a bank that cannot be used as asked; names the file and the fix


@dataclass
class Bank:
    path: str
    header: dict
    features: np.ndarray          # memory-mapped when loaded with mmap=True
    labels: np.ndarray
    indices: np.ndarray
    paths: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.header["num_classes"])

    @property
    def train_class_counts(self) -> list[int]:
        """Training-set counts of the model's classes (for shot splits and head/tail);
        falls back to this bank's own label counts."""
        counts = self.header.get("train_class_counts")
        if counts is None:
            counts = np.bincount(self.labels, minlength=self.num_classes).tolist()
        return [int(c) for c in counts]


def _write_npy(path: str, array: np.ndarray):
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def make_header(count: int, dim: int, dtype: str, num_classes: int, labels: np.ndarray,
                **info) -> dict:
    """The header every bank carries; `info` adds checkpoint, layer, dataset, ..."""
    return {"format": FORMAT, "version": VERSION, "count": int(count), "dim": int(dim),
            "dtype": str(dtype), "num_classes": int(num_classes),
            "label_counts": np.bincount(labels, minlength=num_classes).tolist(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"), **info}


def write_bank(path: str, features: np.ndarray, labels, header: dict | None = None,
               indices=None, paths=None, num_classes: int | None = None) -> str:
    """Write a complete bank (arrays first, header last). Used for assembled extractions and
    for banks made outside this trainer (e.g. synthetic ones in tests)."""
    features = np.asarray(features)
    if features.dtype.name not in DTYPES or features.ndim != 2:
        raise BankError(f"{path}: features must be a 2-D float16/float32 array, got "
                        f"{features.dtype} {features.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    n = len(features)
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    paths = np.asarray([f"[{i}]" for i in indices] if paths is None else paths, dtype=str)
    num_classes = num_classes or int(labels.max()) + 1
    os.makedirs(path, exist_ok=True)
    _write_npy(os.path.join(path, "features.npy"), features)
    finish_bank(path, labels, indices, paths,
                 {**make_header(n, features.shape[1], features.dtype.name, num_classes, labels),
                  **(header or {})})
    return path


def finish_bank(path, labels, indices, paths, header):
    for name, arr in (("labels", labels), ("indices", indices), ("paths", paths)):
        _write_npy(os.path.join(path, f"{name}.npy"), arr)
    write_json_atomic(os.path.join(path, HEADER), header)


def load_bank(path: str, mmap: bool = True) -> Bank:
    """Open a bank and check that its files agree with its header."""
    hpath = os.path.join(path, HEADER)
    if not os.path.isfile(hpath):
        hint = (f"; {os.path.join(path, PARTIAL)} holds an unfinished extraction: re-run the "
                f"same extract command to finish it" if os.path.isdir(os.path.join(path, PARTIAL))
                else "; expected a folder written by `tools/feature_bank.py extract`")
        raise BankError(f"{path}: missing header {HEADER}, so this is not a complete feature "
                        f"bank{hint}")
    header = read_json(hpath)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BankError(f"{hpath}: not a feature-bank header (format != {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in header]
    if missing:
        raise BankError(f"{hpath}: header lacks {', '.join(missing)}")
    least = {"version": 1, "count": 0, "dim": 1, "num_classes": 1}
    wrong = [f"{k} = {header[k]!r}" for k, low in least.items()
             if type(header[k]) is not int or header[k] < low]
    if wrong or header["dtype"] not in DTYPES:
        raise BankError(f"{hpath}: expected positive integers for version, dim and num_classes, "
                        f"a count >= 0 and a dtype in {DTYPES}; got "
                        f"{', '.join(wrong or [repr(header['dtype'])])}")
    if header["version"] > VERSION:
        raise BankError(f"{hpath}: bank format version {header['version']} is newer than this "
                        f"code's ({VERSION})")
    arrays = {name: _load_array(path, name, mmap) for name in ARRAYS}
    _check_shapes(path, header, arrays)
    return Bank(path, header, **arrays)


def _load_array(path: str, name: str, mmap: bool) -> np.ndarray:
    file = os.path.join(path, f"{name}.npy")
    if not os.path.isfile(file):
        raise BankError(f"{file}: missing; the bank is incomplete (re-extract it)")
    try:
        return np.load(file, mmap_mode="r" if mmap and name == "features" else None,
                       allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # pickled objects, a truncated or empty file
        raise BankError(f"{file}: cannot be read as a plain .npy array "
                        f"({first_sentence(e)})") from None


def _check_shapes(path: str, header: dict, arrays: dict):
    n, d = header["count"], header["dim"]
    want = {"features": (n, d), "labels": (n,), "indices": (n,), "paths": (n,)}
    for name, shape in want.items():
        if arrays[name].shape != shape:
            raise BankError(f"{os.path.join(path, name + '.npy')}: shape "
                            f"{arrays[name].shape} does not match the header (count={n}, "
                            f"dim={d}: expected {shape}); the bank is inconsistent, re-extract it")
    if arrays["features"].dtype.name != header["dtype"]:
        raise BankError(f"{path}/features.npy: dtype {arrays['features'].dtype} but the header "
                        f"says {header['dtype']}")
    arrays["labels"] = int_labels(arrays["labels"], header["num_classes"],
                                  os.path.join(path, "labels.npy"), error=BankError)
    finite_floats(arrays["features"], os.path.join(path, "features.npy"), error=BankError)


def check_compatible(query: Bank, ref: Bank):
    """Two banks can only be compared if they live in the same feature space."""
    if query.header["dim"] != ref.header["dim"]:
        raise BankError(f"query bank {query.path} has {query.header['dim']}-d features but "
                        f"reference bank {ref.path} has {ref.header['dim']}-d: they come from "
                        f"different models or layers")
    if query.num_classes != ref.num_classes:
        raise BankError(f"query bank {query.path} has {query.num_classes} classes, reference "
                        f"bank {ref.path} has {ref.num_classes}")
    for key in ("checkpoint_sha256", "layer"):
        a, b = query.header.get(key), ref.header.get(key)
        if a and b and a != b:
            raise BankError(f"query bank {query.path} and reference bank {ref.path} differ in "
                            f"{key} ({a} vs {b}): kNN across different feature spaces is "
                            f"meaningless")


def same_bank(a: Bank, b: Bank) -> bool:
    return os.path.realpath(a.path) == os.path.realpath(b.path)
