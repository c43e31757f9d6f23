"""One loader interface over three backends: torchvision, NVIDIA DALI and FFCV.

``data.loader`` picks the backend; DataBundle asks this module for its loaders, so the engine
never knows which one runs. Every backend

- takes its order from OUR samplers (uniform / class_aware / sqrt / cb, DDP shard
  ``order[rank::world]``, per-epoch reseeding, mid-epoch ``start_batch``), so which samples
  form which batch is identical across backends;
- yields ``(images, labels)``: images float32 ``[B, C, H, W]`` (``[B, 2, C, H, W]`` for the
  two MoCo views), contiguous NCHW, normalized with the same mean/std; labels int64 ``[B]``.
  Tensors may be on CPU or on the training GPU; the engine moves them either way;
- applies the same augmentation recipe (``AugmentSpec``, declared once in augment.py), its
  native parts with its own ops and the rest (MoCo's colour and blur, flips, the "small" crop)
  in batch_aug.py's shared stage, drawn from the per-sample seeds: an exact mid-epoch resume
  reproduces the order with every backend and the pixels with every backend but DALI's and
  FFCV's RandomResizedCrop windows (their own draws).

``auto`` rule (`choose_backend`): DALI when a CUDA device is visible and DALI is installed;
else FFCV when it is installed and this dataset's .beton already exists in ``data.beton_dir``;
else torchvision. Asking by name for a backend that is not installed fails at start-up with the
package to install. Each backend library is imported only by its own modules (dali_loader.py;
ffcv_loader.py, ffcv_beton.py, ffcv_ops.py), and only once that backend is asked for; they
never import this module (no cycle): each registers here as a `Backend`.

Bad images (``data.on_bad_image``): 'fail' stops with the file's path (and list line); 'skip'
drops the image from its batch (the batch gets smaller, the step count stays the same on every
rank) and logs each skip with a running count as a warning on the ``data_pipelines`` loggers.
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from ltrainer.configspec import F, Registry

from .augment import (AUGMENTS, MOCO, RRC_RATIO, RRC_SCALE, AugmentSpec,  # noqa: F401
                      augment_spec, moco_blur_kernel)
from .cpus import cpus_per_process, loader_workers
from .flat import FlatSource, flatten_source, note_skips  # noqa: F401  (re-exported)
from .sources import ArraySource, DataError, FileSource

AUGMENT_KINDS = tuple(AUGMENTS)
BAD_IMAGE_POLICIES = ("fail", "skip")
DEFAULT_BETON_DIR = "data/betons"

log = logging.getLogger("data_pipelines.loaders")


class BackendUnavailable(DataError):
    """The configured loader backend is not installed (or cannot run here)."""


# ----------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backend:
    """One accelerated backend: the module of this package that alone imports its library,
    how to install it, and how to build its loader from the config (``make``)."""
    name: str
    module: str
    install_hint: str
    make: object            # (cfg, dataset, sampler, batch_size, seed, spec, policy) -> loader

    def available(self) -> tuple[bool, str]:
        """(installed and importable, reason if not); imports the module once per process."""
        if self.name not in _STATUS:
            try:
                importlib.import_module(f"{__package__}.{self.module}")
                _STATUS[self.name] = (True, "")
            except (ImportError, OSError) as exc:  # OSError: a shared library is missing
                _STATUS[self.name] = (False, f"{type(exc).__name__}: {exc}")
        return _STATUS[self.name]


_STATUS: dict = {}
BACKENDS: dict = {}     # name -> Backend, filled by register_backend below


def register_backend(backend: Backend, config: dict | None = None) -> None:
    """Make a backend selectable as data.loader = name, with its own config keys."""
    BACKENDS[backend.name] = backend
    INSTALL_HINTS[backend.name] = backend.install_hint
    LOADERS.add(backend.name, backend.make, config=config)


INSTALL_HINTS: dict = {}


def backend_status(name: str) -> tuple[bool, str]:
    """(installed and importable, reason if not). Imports the backend's module of this package,
    which alone imports the backend (and loads its shared libraries: libturbojpeg, OpenCV)."""
    if name == "torchvision":
        return True, ""
    if name not in BACKENDS:
        raise ValueError(f"unknown loader backend {name!r}")
    return BACKENDS[name].available()


def require_backend(name: str) -> None:
    problems = backend_problems({"loader": name})
    if problems:
        raise BackendUnavailable(problems[0])


def backend_problems(cfg) -> list[str]:
    """The asked-for backend cannot be imported here (for --dry-run: at start-up it would stop
    the run); 'auto' falls back by itself."""
    name = cfg["loader"]
    if name not in INSTALL_HINTS:
        return []
    ok, why = backend_status(name)
    return [] if ok else [f"data.loader = {name!r} but {name.upper()} cannot be imported "
                          f"({why}); install it with: {INSTALL_HINTS[name]}"]


def cuda_device() -> int | None:
    """The CUDA device this process trains on (the engine set it), or None on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    return None


def dali_device_id(cfg) -> int | None:
    choice = cfg.get("dali_device", "auto")
    dev = cuda_device()
    if choice == "cpu":
        return None
    if choice == "gpu" and dev is None:
        raise BackendUnavailable("data.dali_device = 'gpu' but no CUDA device is visible; "
                                 "set data.dali_device: cpu (or auto)")
    return dev


def beton_dir(cfg) -> str:
    return cfg.get("beton_dir") or DEFAULT_BETON_DIR


def choose_backend(cfg, dataset) -> str:
    """The backend for one dataset: ``data.loader`` itself, or the ``auto`` rule above."""
    name = cfg.get("loader", "torchvision")
    if name not in LOADER_KINDS:
        raise DataError(f"data.loader = {name!r}: expected one of {', '.join(LOADER_KINDS)}")
    if name != "auto":
        if name != "torchvision":
            require_backend(name)
        return name
    if cuda_device() is not None and backend_status("dali")[0]:
        return "dali"
    if backend_status("ffcv")[0]:
        from .ffcv_loader import beton_path_for

        if os.path.exists(beton_path_for(dataset.source, beton_dir(cfg))):
            return "ffcv"
    return "torchvision"


def _threads(cfg, key: str) -> int:
    """Loader threads per process: the key if set, else data.workers, else the cores we own."""
    cores = cpus_per_process(omp=False)   # loader threads: Slurm's or the cores' budget
    n = int(cfg.get(key) or 0) or min(int(cfg.get("workers") or 0), cores)
    return n if n > 0 else cores


def make_train_loader(cfg, dataset, sampler, *, batch_size: int, seed: int, in_channels: int,
                      backend: str | None = None):
    """An iterable of training batches in ``sampler`` order (re-pointed by set_epoch).

    ``seed`` seeds the backend's own randomness (give each rank its own); ``backend``
    overrides ``cfg['loader']`` (tests and the benchmark use it).
    """
    return _make(cfg, dataset, sampler, batch_size, seed, in_channels, True, backend)


def make_eval_loader(cfg, dataset, sampler, *, batch_size: int, seed: int, in_channels: int,
                     backend: str | None = None):
    """An iterable of evaluation batches (no drop, deterministic) in ``sampler`` order."""
    return _make(cfg, dataset, sampler, batch_size, seed, in_channels, False, backend)


def _make(cfg, dataset, sampler, batch_size, seed, in_channels, train, backend):
    if getattr(dataset, "transform", None) is None and not isinstance(
            flatten_source(dataset.source).base, (ArraySource, FileSource)):
        # Not images (e.g. cached features): nothing to decode or augment, so no accelerated
        # backend applies; the plain DataLoader batches them.
        backend = "torchvision"
    backend = backend or choose_backend(cfg, dataset)
    policy = cfg.get("on_bad_image", "fail")
    if policy not in BAD_IMAGE_POLICIES:
        raise DataError(f"data.on_bad_image = {policy!r}: expected one of "
                        f"{', '.join(BAD_IMAGE_POLICIES)}")
    spec = augment_spec(cfg, train, in_channels)
    if backend not in LOADERS or backend == "auto":
        raise DataError(f"unknown loader backend {backend!r}; expected one of "
                        f"{', '.join(LOADER_KINDS)}")
    return LOADERS[backend](cfg, dataset, sampler, batch_size, seed, spec, policy)


def _dali_loader(cfg, dataset, sampler, batch_size, seed, spec, policy):
    require_backend("dali")
    from .dali_loader import DaliLoader

    return DaliLoader(dataset, sampler, batch_size, spec, seed=seed,
                      threads=_threads(cfg, "dali_threads"), device_id=dali_device_id(cfg),
                      on_bad_image=policy)


def _ffcv_loader(cfg, dataset, sampler, batch_size, seed, spec, policy):
    require_backend("ffcv")
    from .ffcv_loader import FfcvLoader, ensure_beton

    path = ensure_beton(dataset.source, beton_dir(cfg), on_bad_image=policy)
    dev = cuda_device()   # on a GPU, normalize there: uint8 crosses PCIe, not float32
    return FfcvLoader(path, dataset, sampler, batch_size, spec, seed=seed,
                      threads=_threads(cfg, "workers"), on_bad_image=policy,
                      device=None if dev is None else torch.device("cuda", dev))


# ----------------------------------------------------------------------------- torchvision

def _torchvision_loader(cfg, dataset, sampler, batch_size, seed, spec, policy):
    from .torchvision_loader import build_torchvision_loader

    # Pinned batches make the engine's non_blocking copies asynchronous (from pageable memory
    # they are synchronous); the pinning runs in the DataLoader's own thread.
    pin = torch.cuda.is_available()
    workers = loader_workers(cfg["workers"])   # never more than this process's cores allow
    # On a GPU (or for MoCo, whose colour stage is much cheaper batched) the workers stop at
    # uint8 and gpu_input.StagedLoader does the rest on the batch, on the training device
    # (files with the imagenet recipe take decode.py's crop-sized decoding instead).
    from . import decode

    transform = getattr(dataset, "transform", None)
    dev = cuda_device() if hasattr(transform, "crops_only") else None
    staged = hasattr(transform, "crops_only") and (transform.prefer_batched or (
        dev is not None and not decode.supports(dataset, spec)))
    if staged:
        dataset = copy.copy(dataset)
        dataset.transform = transform.crops_only()
    if policy == "fail":
        loader = build_torchvision_loader(dataset, sampler, batch_size, workers, seed,
                                          pin_memory=pin, spec=spec)   # spec: decode.py's path
    else:
        loader = SkippingLoader(dataset, sampler, batch_size, workers, seed, pin_memory=pin)
    if not staged:
        return loader
    from .gpu_input import StagedLoader

    return StagedLoader(loader, dataset.transform.stage, sampler, batch_size,
                        device=None if dev is None else torch.device("cuda", dev))


# Every backend reads data.workers and data.on_bad_image; DALI and FFCV add their own keys.
LOADERS = Registry("data.loader", default="torchvision",
                   help="auto = DALI on GPU if installed, else FFCV if installed and the data "
                        "set's .beton exists, else torchvision", config={"data": {
                            "workers": F("int", 0, ge=0, help="DataLoader workers per rank, "
                                         "capped to its cores - 1 (data_pipelines/cpus.py)"),
                            "on_bad_image": F("str", "fail", *BAD_IMAGE_POLICIES,
                                              help="missing/corrupt image: stop with its path, "
                                                   "or drop and count"),
                        }})
LOADERS.add("torchvision", _torchvision_loader)
register_backend(Backend(
    "dali", "dali_loader", "pip install nvidia-dali-cuda130  (or: pip install -e '.[dali]')",
    _dali_loader), config={"data": {
        "dali_threads": F("int", 0, ge=0, help="DALI threads per rank; 0 = data.workers or cores"),
        "dali_device": F("str", "auto", "auto", "cpu", "gpu",
                         help="DALI decoding/ops on the GPU when one is visible (auto)"),
    }})
register_backend(Backend(
    "ffcv", "ffcv_loader", "apt-get install pkg-config libturbojpeg0-dev libopencv-dev, then "
    "pip install ffcv opencv-python-headless numba  (or: pip install -e '.[ffcv]')",
    _ffcv_loader), config={"data": {"beton_dir": F(
        "str", None, nullable=True, help="FFCV .beton folder (written on first use); null = "
                                         "data/betons")}})
LOADERS.add("auto", choose_backend)   # resolved per data set to one of the above
LOADER_KINDS = tuple(LOADERS)


class _SkipBadDataset(torch.utils.data.Dataset):
    """Wraps a dataset so an unreadable image becomes a marker instead of an exception."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else int(key)   # (index, seed) keys too
        seed = key[1] if isinstance(key, tuple) else 0
        try:
            return (*self.dataset[key], index, seed)
        except DataError as exc:
            return None, str(exc), index, seed


def _collate_skipping(items):
    good = [it for it in items if it[0] is not None]
    bad = [it[1] for it in items if it[0] is None]
    if not good:
        return None, None, bad, None, None
    xs, ys, index, seeds = zip(*good)
    return (torch.stack(xs), torch.stack(ys), bad, torch.tensor(index, dtype=torch.long),
            np.asarray(seeds, dtype=np.int64))


class SkippingLoader:
    """torchvision DataLoader that drops unreadable images from their batch and counts them.

    A batch keeps its place (the step count stays ``sampler.num_batches``, equal on every
    rank); it only gets smaller. Each skip is logged with its path. ``batch_indices``: the
    dataset indices of the batch last yielded (the engine orders evaluation rows by them).
    """

    def __init__(self, dataset, sampler, batch_size, workers, seed, pin_memory=False):
        from torch.utils.data import DataLoader

        from .torchvision_loader import WorkerSeeder

        g = torch.Generator()
        g.manual_seed(int(seed) & ((1 << 63) - 1))
        self.loader = DataLoader(_SkipBadDataset(dataset), batch_size=batch_size,
                                 sampler=sampler, num_workers=workers,
                                 collate_fn=_collate_skipping, worker_init_fn=WorkerSeeder(seed),
                                 generator=g, persistent_workers=workers > 0,
                                 pin_memory=pin_memory)
        self.skipped = 0
        self.batch_indices = None
        self.batch_seeds = None   # per-sample seeds of that batch (gpu_input.StagedLoader)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y, bad, index, seeds in self.loader:
            for msg in bad:
                self.skipped += 1
                log.warning("skipped bad image (data.on_bad_image=skip, %d so far): %s",
                            self.skipped, msg)
            if x is None:
                raise DataError(f"every image of a batch is unreadable (first: {bad[0]}); "
                                f"check the data set")
            self.batch_indices, self.batch_seeds = index, seeds
            yield x, y
