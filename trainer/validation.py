"""Checks of arrays and tensors read from files a user hands us (pseudo-label files, feature
banks, imported weights, checkpoints).

Such a file may come from another version of the code, another machine or a diverged run, and
a bad value in it (a label 99 of 10 classes, a NaN feature, a NaN weight) otherwise surfaces
much later as an IndexError mid-training or as accuracy figures with exit status 0. Every
check here fails in one line naming the file and what was expected, raised as a user error
(DataError unless the caller passes its own subclass) so that the launchers and tools print it
without a traceback and exit 2.
"""
from __future__ import annotations

import numpy as np

from ltrainer.data_pipelines.sources import DataError

CHUNK_BYTES = 64 << 20  # finite checks read memory-mapped arrays this much at a time


def first_sentence(exc: BaseException, most: int = 160) -> str:
    """The gist of a library's exception (torch's run over many lines) for a one-line error."""
    text = " ".join(str(exc).split())
    cut = text.find(". ")
    text = text if cut < 0 else text[:cut]
    return text if len(text) <= most else text[:most - 3] + "..."


def int_labels(labels, num_classes: int, where: str, low: int = 0,
               error: type = DataError) -> np.ndarray:
    """`labels` as int64 after checking it is a 1-D integer array with values in
    [low, num_classes); `where` names the file (and array) in the error."""
    a = np.asarray(labels)
    if a.ndim != 1:
        raise error(f"{where}: expected a 1-D array of class labels, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise error(f"{where}: expected integer class labels, got dtype {a.dtype}")
    bad = np.nonzero((a < low) | (a >= num_classes))[0]
    if len(bad):
        raise error(f"{where}: labels must lie in [{low}, {num_classes}) ({num_classes} "
                    f"classes), but row {bad[0]} holds {a[bad[0]]} ({len(bad)} rows out of "
                    f"range)")
    return a.astype(np.int64, copy=False)


def finite_floats(a, where: str, low: float | None = None, high: float | None = None,
                  error: type = DataError):
    """Check a float array holds only finite values (within [low, high] when given), a block
    of rows at a time, so that a memory-mapped bank of 437k x 2048 is never read whole."""
    if not np.issubdtype(a.dtype, np.floating):
        raise error(f"{where}: expected floating-point values, got dtype {a.dtype}")
    if a.ndim == 0:
        a = a.reshape(1)
    rows = max(1, CHUNK_BYTES // max(1, a[:1].nbytes))
    span = "" if low is None and high is None else f" in [{low}, {high}]"
    for start in range(0, len(a), rows):
        block = np.ascontiguousarray(a[start:start + rows])
        if low is None and high is None and _all_finite(block):
            continue
        ok = np.isfinite(block)
        if low is not None:
            ok &= block >= low
        if high is not None:
            ok &= block <= high
        if not ok.all():
            pos = tuple(np.argwhere(~ok)[0])
            cell = f"row {start + pos[0]}" + (f", column {pos[1]}" if len(pos) > 1 else "")
            raise error(f"{where}: expected finite values{span}, but {cell} holds "
                        f"{block[pos]} ({int((~ok).sum())} bad values in rows {start}.."
                        f"{start + len(block) - 1})")


# IEEE floats by size: the unsigned view and the bits of inf (|x| below them means finite)
_INF_BITS = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000),
             8: (np.uint64, 0x7FF0000000000000)}


def _all_finite(block: np.ndarray) -> bool:
    """np.isfinite(block).all() on the bits: 6x faster on float16, which numpy emulates
    (a memory-mapped 437k x 2048 float16 bank: 0.7-2 s instead of 5-6 s here)."""
    if block.dtype.itemsize not in _INF_BITS:
        return bool(np.isfinite(block).all())
    utype, inf = _INF_BITS[block.dtype.itemsize]
    bits = np.bitwise_and(block.view(utype), utype(inf | (inf - 1)))
    return bool(bits.max(initial=0) < inf)


def tensors_of(obj, prefix: str = ""):
    """(dotted key, tensor) for every tensor in nested dicts, lists and tuples."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_of(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors_of(v, f"{prefix}.{i}" if prefix else str(i))


def finite_tensors(obj, where: str, error: type = DataError):
    """Refuse a state dict (or any nest of tensors) holding NaN or inf, naming the first bad
    key: loading one silently gives a model that predicts one class, or NaN losses."""
    import torch

    bad = [k for k, t in tensors_of(obj) if (t.is_floating_point() or t.is_complex())
           and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise error(f"{where}: tensor '{bad[0]}' holds NaN or inf values{more}; the weights are "
                    f"broken (a diverged run?) and are not used")


def describe(obj) -> str:
    """What a file held instead of what was expected, in a few words."""
    shape = getattr(obj, "shape", None)
    if shape is not None:
        return f"a {type(obj).__name__} of shape {tuple(shape)}"
    if isinstance(obj, dict):
        keys = [str(k) for k in list(obj)[:5]]
        return (f"a dict with keys {', '.join(keys)}{', ...' if len(obj) > 5 else ''}"
                if obj else "an empty dict")
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"
