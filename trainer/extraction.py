"""The extraction service: every split-wide pass of a model (the kNN monitor's bank, the cRT
feature cache, pseudo-labels, feature banks) runs through here, sharded (each rank its own
rows, never gathered), chunked (memory bounded by a chunk or block, not by the split) and, for
passes over a dataset, resumable (a killed pass redoes only its missing chunks).

Two sources of batches, one set of consumers:
- the engine's `embed(split, fn, gather=False, indices=True, on_batch=sink)` (its loader
  backend, its shard of the split), for passes inside a run;
- `run_chunks`, a pass over any dataset in fixed chunks (chunk c = samples [c*S, (c+1)*S))
  that the ranks share and write atomically, for the tools (and resumable);
and the consumers:
- `BlockRows`: this rank's rows in preallocated blocks of a dtype (the kNN monitor's shard);
- `ShardWriter`: this rank's rows to chunk files in a folder (pseudo-labels, the cRT cache);
- `assemble_rows`: chunk files -> one .npy, chunk by chunk through a memory map, rows placed
  by their dataset index (rank 0, memory: one chunk plus N labels).

`bounded_heap` keeps glibc from holding on to the freed batch buffers of such a pass.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import json
import math
import os
import shutil

import numpy as np
import torch
from tqdm import tqdm

from . import distributed as dist_utils
from .checkpoint import atomic_write, write_json_atomic

MANIFEST = "manifest.json"
_HEAP = {"depth": 0}
M_MMAP_THRESHOLD = -3            # mallopt parameter (malloc.h)
HEAP_MMAP_THRESHOLD = 1 << 16    # in a pass: buffers of >= 64 KB are mmapped, freeing returns them
TRAIN_MMAP_THRESHOLD = 32 << 20  # after it: glibc's own upper bound (DEFAULT_MMAP_THRESHOLD_MAX)


class ExtractionError(ValueError):
    """A pass that cannot go on as asked; the message names the folder and the fix."""


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):   # not glibc
        return False


@contextlib.contextmanager
def bounded_heap():
    """Within: glibc's mmap threshold fixed at 64 KB, so freed batch buffers go back to the
    system at once. glibc raises its threshold to the size of the last freed mmapped buffer (up
    to 32 MB), so after the first few batches every batch-sized tensor comes from the heap, and
    a heap with long-lived blocks interleaved keeps the freed ones: a 427 MB kNN bank cost
    1.2-1.8 GB of RSS per rank (README "Scale"). On leaving: a fixed 32 MB threshold (where
    glibc's own would end up) and the heap's free top trimmed, so training, whose every
    allocation would cost an mmap / munmap under 64 KB (+35-50 % CPU time: bench_train --heap),
    is not slowed. Reentrant; a no-op where mallopt does not exist."""
    first = _HEAP["depth"] == 0
    if first:
        _mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    _HEAP["depth"] += 1
    try:
        yield
    finally:
        _HEAP["depth"] -= 1
        if first:
            _mallopt(M_MMAP_THRESHOLD, TRAIN_MMAP_THRESHOLD)
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass


def heap_bounded(fn):
    """Decorator: fn runs inside bounded_heap() (Trainer.embed)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with bounded_heap():
            return fn(*args, **kwargs)
    return wrapper


class BlockRows:
    """on_batch sink keeping this rank's rows in preallocated blocks of `dtype`: the peak is
    the rows plus one block (not a list of batches plus their concatenation, nor a heap
    fragmented by thousands of small kept tensors). `finish()` -> (blocks, labels)."""

    def __init__(self, dtype: torch.dtype, block_rows: int = 16384):
        self.dtype, self.block_rows = dtype, block_rows
        self.blocks, self.labels, self.filled = [], [], 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor, ids=None) -> None:
        a = 0
        while a < len(out):
            if not self.blocks or self.filled == len(self.blocks[-1]):
                self.blocks.append(out.new_empty((self.block_rows, *out.shape[1:]),
                                                 dtype=self.dtype))
                self.labels.append(y.new_empty(self.block_rows))
                self.filled = 0
            f, n = self.filled, min(len(out) - a, self.block_rows - self.filled)
            self.blocks[-1][f:f + n].copy_(out[a:a + n])
            self.labels[-1][f:f + n].copy_(y[a:a + n])
            self.filled, a = f + n, a + n

    def finish(self, device=None) -> tuple[list, torch.Tensor]:
        if self.blocks and self.filled < len(self.blocks[-1]):
            self.blocks[-1] = self.blocks[-1][:self.filled].clone()
            self.labels[-1] = self.labels[-1][:self.filled]
        labels = torch.cat(self.labels) if self.labels else \
            torch.empty(0, dtype=torch.long, device=device)
        blocks, self.blocks, self.labels = self.blocks, [], []
        return blocks, labels


def _save_chunk(path: str, features, labels, indices):
    atomic_write(path, lambda f: np.savez(f, features=features, labels=labels,
                                          indices=np.asarray(indices, dtype=np.int64)))


class ShardWriter:
    """on_batch sink (use embed with indices=True) writing this rank's rows, with their dataset
    indices, to `folder`/rank{r}_{n}.npz every `chunk_rows` rows: memory is one chunk."""

    def __init__(self, folder: str, rank: int, dtype: str = "float32", chunk_rows: int = 8192):
        self.folder, self.rank, self.dtype, self.chunk_rows = folder, rank, dtype, chunk_rows
        self.parts, self.rows, self.written = [], 0, 0
        os.makedirs(folder, exist_ok=True)
        for old in glob.glob(os.path.join(folder, f"rank{rank:03d}_*.npz")):
            os.remove(old)      # a pass that died: its files are of an older pass

    def __call__(self, out: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        self.parts.append((out.detach().cpu().numpy().astype(self.dtype),
                           y.cpu().numpy().astype(np.int64), ids.cpu().numpy()))
        self.rows += len(out)
        if self.rows >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        f, y, i = (np.concatenate(p) for p in zip(*self.parts))
        _save_chunk(os.path.join(self.folder, f"rank{self.rank:03d}_{self.written:06d}.npz"),
                    f, y, i)
        self.parts, self.rows, self.written = [], 0, self.written + 1


def embed_to_files(embed, split: str, fn, folder: str, rank: int, dtype: str = "float32",
                   chunk_rows: int = 8192) -> None:
    """fn over a split through the engine's embed, each rank writing its rows to `folder`;
    every rank returns once all have written (then `assemble_rows`)."""
    writer = ShardWriter(folder, rank, dtype, chunk_rows)
    embed(split, fn, gather=False, indices=True, on_batch=writer)
    writer.flush()
    dist_utils.barrier()


def chunk_files(folder: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, "*.npz")))


def assemble_rows(folder: str, count: int, out_npy: str | None = None, dtype=None):
    """(features, labels, present) of `count` dataset rows from the chunk files of `folder`,
    read one at a time and placed by index. features: a memory-mapped .npy at `out_npy`
    (written atomically), or an array in memory when out_npy is None (small passes)."""
    labels = np.zeros(count, dtype=np.int64)
    present = np.zeros(count, dtype=bool)
    feats, tmp = None, None
    for path in chunk_files(folder):
        with np.load(path, allow_pickle=False) as z:
            f, y, idx = z["features"], z["labels"], z["indices"]
        if len(idx) != len(f) or (len(idx) and (idx.min() < 0 or idx.max() >= count)):
            raise ExtractionError(f"{path}: holds rows outside 0..{count - 1}; delete "
                                  f"{folder} and extract again")
        if feats is None:
            shape, dt = (count, *f.shape[1:]), np.dtype(dtype or f.dtype)
            if out_npy:
                tmp = f"{out_npy}.tmp.{os.getpid()}"
                feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=dt, shape=shape)
            else:
                feats = np.zeros(shape, dtype=dt)
        feats[idx], labels[idx], present[idx] = f, y, True
    if feats is None:
        raise ExtractionError(f"{folder}: no chunk files: nothing was extracted")
    if tmp:
        feats.flush()
        del feats
        os.replace(tmp, out_npy)
        feats = np.load(out_npy, mmap_mode="r", allow_pickle=False)
    return feats, labels, present


# ------------------------------------------------------------ passes over a dataset, resumable

def chunk_path(part: str, c: int) -> str:
    return os.path.join(part, f"chunk_{c:06d}.npz")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ExtractionError(f"{path}: not valid JSON ({e})") from None


def check_manifest(part: str, identity: dict, create: bool = True) -> str | None:
    """Create the partial pass's manifest, or say why an existing one is another pass."""
    mpath = os.path.join(part, MANIFEST)
    if not os.path.isfile(mpath):
        if create:
            os.makedirs(part, exist_ok=True)
            write_json_atomic(mpath, identity)
        return None
    old = read_json(mpath)
    diff = [k for k in identity if k != "checkpoint" and old.get(k) != identity[k]]
    if not diff:
        return None
    details = "; ".join(f"{k}: {old.get(k)!r} there, {identity[k]!r} now" for k in diff)
    return (f"{os.path.dirname(part)}: holds a partial bank of another extraction "
            f"(checkpoint {old.get('checkpoint')}); refusing to mix them. Differences: "
            f"{details}. Use another output folder, or delete {part} to start over.")


def _run_chunk(dataset, rows, forward, batch_size: int, workers: int, dtype: str):
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows),
                                         batch_size=batch_size, num_workers=workers)
    feats, labels = [], []
    for images, y in loader:
        feats.append(forward(images).numpy().astype(dtype))
        labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def run_chunks(part: str, dataset, forward, identity: dict, *, chunk_size: int = 4096,
               batch_size: int = 256, dtype: str = "float32", workers: int = 0, rank: int = 0,
               world_size: int = 1, progress: bool = True, desc: str = "extract") -> int:
    """forward(images) -> (B, D) CPU rows over `dataset`, chunk by chunk into `part`; the ranks
    share the chunks still missing, so a killed pass resumes with any number of ranks.
    `identity` is what a resumed pass must agree with. Returns the number of chunks; every
    rank returns once all chunks exist."""
    nchunks = math.ceil(len(dataset) / chunk_size)
    todo = None
    if rank == 0:
        err = check_manifest(part, identity)
        todo = err or [c for c in range(nchunks) if not os.path.isfile(chunk_path(part, c))]
    todo = dist_utils.broadcast_object(todo)
    if isinstance(todo, str):
        raise ExtractionError(todo)
    with bounded_heap():
        for c in tqdm(todo[rank::world_size], desc=desc, unit="chunk",
                      disable=not progress or rank != 0):
            rows = list(range(c * chunk_size, min(len(dataset), (c + 1) * chunk_size)))
            feats, labels = _run_chunk(dataset, rows, forward, batch_size, workers, dtype)
            _save_chunk(chunk_path(part, c), feats, labels, rows)
    dist_utils.barrier()
    return nchunks


# ------------------------------------------------------------------ the frozen-feature cache

class MappedRows:
    """A source (data_pipelines' interface) over cached feature rows in a memory-mapped .npy:
    load(i) widens one row to float32. Ranks share the file's pages instead of each holding
    the split."""

    def __init__(self, path: str, labels: np.ndarray, rows: np.ndarray, num_classes: int):
        self.path, self.rows = path, rows
        self.features = np.load(path, mmap_mode="r", allow_pickle=False)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes, self.name, self.in_channels = int(num_classes), "features", 0

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.features[self.rows[i]], dtype=np.float32))

    def describe(self, i: int) -> str:
        return f"{self.path}[{int(self.rows[i])}]"


def cache_split(embed, split: str, fn, folder: str, rank: int, count: int, num_classes: int,
                dtype: str = "float16") -> MappedRows:
    """fn over a split of `count` samples, once: each rank writes its rows, rank 0 assembles
    them into `folder`/features.npy (`dtype`, float16 by default: half of float32, exact
    enough for a linear classifier on frozen features), every rank maps that file. Samples the
    loader skipped are left out."""
    rows_dir = os.path.join(folder, "rows")
    embed_to_files(embed, split, fn, rows_dir, rank, dtype=dtype)
    path = os.path.join(folder, "features.npy")
    if rank == 0:
        _, labels, present = assemble_rows(rows_dir, count, path)
        shutil.rmtree(rows_dir)
        atomic_write(os.path.join(folder, "labels.npy"),
                     lambda f: np.save(f, np.where(present, labels, -1), allow_pickle=False))
    dist_utils.barrier()
    labels = np.load(os.path.join(folder, "labels.npy"), allow_pickle=False)
    rows = np.flatnonzero(labels >= 0)
    return MappedRows(path, labels[rows], rows, num_classes)


class HitCounts:
    """on_batch sink for G predictions per image ([B, G] classes, e.g. one per tau of a
    grid): per prediction the per-class hits, and the per-class totals; (G + 1) x C numbers
    whatever the split. `total()`: summed over the ranks (every rank calls it)."""

    def __init__(self, num_classes: int, groups: int, device=None):
        self.counts = torch.zeros((groups + 1, num_classes), dtype=torch.long, device=device)

    def __call__(self, preds: torch.Tensor, y: torch.Tensor, ids=None) -> None:
        y, c = y.long().to(self.counts.device), self.counts.shape[1]
        preds = preds.long().to(self.counts.device)
        for g in range(len(self.counts) - 1):
            self.counts[g] += torch.bincount(y[preds[:, g] == y], minlength=c)
        self.counts[-1] += torch.bincount(y, minlength=c)

    def total(self) -> np.ndarray:
        return dist_utils.all_reduce_sum(self.counts).cpu().numpy()
