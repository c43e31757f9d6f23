"""Atomic checkpoints with everything exact resume needs, loaded with weights_only=True.

A checkpoint is written to a temporary file in the same folder and renamed over the old one,
so a job killed while saving leaves the previous checkpoint intact. RNG states are stored as
tensors and plain Python values so that `torch.load(weights_only=True)` accepts them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random

import numpy as np
import torch

LAST = "checkpoint_last.pt"

# Write failures that are the disk's, not the program's, in words.
DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


class DiskError(Exception):
    """A file of the run could not be written because of the disk (full, read-only, ...)."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


def _disk_cause(exc: BaseException | None) -> OSError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:   # torch.save hides the OSError in __context__
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def disk_errors(path: str):
    """Turn a full disk or a read-only folder met while writing `path` into a DiskError that
    says so, instead of torch's 'unexpected pos 88448 vs 88344'."""
    try:
        yield
    except DiskError:
        raise
    except Exception as e:
        cause = _disk_cause(e)
        if cause is None:
            raise
        raise DiskError(cause.errno, f"{DISK_ERRNOS[cause.errno]} while writing {path} "
                                     f"({cause.strerror})") from None


def atomic_write(path: str, write):
    """Call write(binary file) on a temporary file beside `path`, fsync, then rename it over
    `path`: readers see the old file or the new one, never a half-written one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with disk_errors(path):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, obj):
    """`obj` as indented JSON, atomically (the one JSON writer for files a run relies on)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def atomic_save(obj, path: str):
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_load(path: str, map_location="cpu"):
    """Load a checkpoint we (or anyone) wrote without executing pickled code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated file, foreign pickle, ...
        raise RuntimeError(f"{path}: cannot be read as a checkpoint ({e})") from None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _python_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_state(saved, rank: int) -> dict:
    """This rank's RNG state from a checkpoint: checkpoints hold a list, one state per rank
    (older ones a single state, which every rank then restores)."""
    if isinstance(saved, dict):
        return saved
    if rank >= len(saved):
        raise RuntimeError(f"the checkpoint holds RNG states of {len(saved)} processes; this "
                           f"is rank {rank}")
    return saved[rank]


def set_rng_state(state: dict):
    """Restore states saved by rng_state(); they must be CPU tensors (load checkpoints with
    map_location='cpu': torch.set_rng_state refuses a CUDA tensor)."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         int(pos), int(has_gauss), float(cached)))
    random.setstate(_python_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_tensor(st) -> torch.Tensor:
    version, internal, gauss = st
    # version, 625 state words, then a flag + value for the cached gaussian
    return torch.tensor([version, *internal, gauss is not None,
                         0 if gauss is None else int(np.float64(gauss).view(np.int64))],
                        dtype=torch.int64)


def _python_state_from_tensor(t: torch.Tensor):
    vals = [int(v) for v in t.tolist()]
    gauss = float(np.int64(vals[-1]).view(np.float64)) if vals[-2] else None
    return (vals[0], tuple(vals[1:-2]), gauss)


def last_checkpoint(run_dir: str) -> str | None:
    path = os.path.join(run_dir, LAST)
    return path if os.path.isfile(path) else None


# ------------------------------------------------------------------ a method's own state
UNLABELED_KEYS = ("unlabeled_epoch", "unlabeled_batch")


def method_state(method) -> dict:
    """The method module's state (key encoder, teacher, queue, `state_fields`) without its
    model's tensors, which the checkpoint holds once, under 'model' (also where another
    submodule shares them, as LWS's scaled head)."""
    shared = {(t.data_ptr(), t.numel()) for t in method.model.state_dict().values()
              if t.numel()}
    return {k: v for k, v in method.state_dict().items() if not k.startswith("model.")
            and not (torch.is_tensor(v) and (v.data_ptr(), v.numel()) in shared)}


def load_method_state(method, state: dict, path: str) -> dict | None:
    """Load checkpoint `state`'s method part into `method` (after the model); returns the
    unlabeled pool's position (None without one). Checkpoints of the hand-written format
    (before methods were modules: nested dicts, plain values beside tensors) are converted;
    a state that still does not fit this method fails with the keys that differ."""
    saved, unlabeled = dict(state["method"]), state.get("unlabeled")
    expected = method_state(method)
    if "_extra_state" not in saved:
        saved, legacy_unlabeled = _upgrade(method, saved, expected)
        unlabeled = unlabeled or legacy_unlabeled
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise RuntimeError(f"{path}: its method state does not fit method '{method.name}' "
                           f"(missing {len(missing)} keys {missing[:4]}, unexpected "
                           f"{len(unexpected)} {unexpected[:4]}): written by "
                           f"another method or version; resume it with the code that wrote "
                           f"it, or start the stage in a new run folder")
    method.load_state_dict(saved, strict=False)   # strict=False: the model came from 'model'
    return unlabeled


def _upgrade(method, saved: dict, expected: dict) -> tuple[dict, dict | None]:
    """The old format: {'key_model': {...}, 'queue': t, 'queue_ptr': 3, 'scales': t, ...}."""
    unlabeled = {k: saved.pop(k) for k in UNLABELED_KEYS if k in saved} or None
    flat, extra = {}, {}
    for k, v in saved.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{name}": t for name, t in v.items()})
        elif k in expected:
            flat[k] = v
        elif torch.is_tensor(v) and len([e for e in expected if e.endswith("." + k)]) == 1:
            flat[next(e for e in expected if e.endswith("." + k))] = v   # scales -> scaled.scales
        else:
            extra[k] = v
    flat["_extra_state"] = {**method.get_extra_state(), **extra}
    return flat, unlabeled
