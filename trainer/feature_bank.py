"""Feature banks: features of a checkpoint on a dataset, stored as .npy files, and what we ask
of them (kNN accuracy, nearest neighbours, tail-class leakage, classifier weight norms).

A bank is a folder::

    header.json    written last, so its presence means "complete"; says which checkpoint
                   (and its sha256), layer and dataset made the features, and the counts
    features.npy   (N, D) float16 or float32
    labels.npy     (N,) int64
    indices.npy    (N,) int64, the sample's index in the split it was read from
    paths.npy      (N,) unicode, the image file (or "name[index]" for array datasets)

No pickle anywhere: every array is a plain .npy and loads with allow_pickle=False.

Extraction is cut into fixed chunks of the dataset (chunk c = samples [c*S, (c+1)*S)), each
written atomically to .partial/ by whichever rank owns it. A killed extraction therefore
resumes by redoing only the missing chunks, with any number of ranks, and the assembled bank
is the same. faiss is imported only by the functions that search.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import atomic_write
from .transfer import final_weights, read_weights
from .validation import finite_floats, first_sentence, int_labels

FORMAT = "ltt-feature-bank"
VERSION = 1
HEADER = "header.json"
PARTIAL = ".partial"
MANIFEST = "manifest.json"
ARRAYS = ("features", "labels", "indices", "paths")
REQUIRED_KEYS = ("format", "version", "count", "dim", "dtype", "num_classes")
DTYPES = ("float16", "float32")


class BankError(ValueError):
    """A bank that cannot be used as asked; the message names the file and the fix."""


def require(module: str, pip_name: str):
    """Import an optional package, or say which pip package provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs the optional package '{pip_name}': "
                          f"pip install {pip_name}") from None


# =============================================================================== bank files

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


def _write_json(path: str, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _write_npy(path: str, array: np.ndarray):
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BankError(f"{path}: not valid JSON ({e})") from None


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
    _finish_bank(path, labels, indices, paths,
                 {**make_header(n, features.shape[1], features.dtype.name, num_classes, labels),
                  **(header or {})})
    return path


def _finish_bank(path, labels, indices, paths, header):
    for name, arr in (("labels", labels), ("indices", indices), ("paths", paths)):
        _write_npy(os.path.join(path, f"{name}.npy"), arr)
    _write_json(os.path.join(path, HEADER), header)


def load_bank(path: str, mmap: bool = True) -> Bank:
    """Open a bank and check that its files agree with its header."""
    hpath = os.path.join(path, HEADER)
    if not os.path.isfile(hpath):
        hint = (f"; {os.path.join(path, PARTIAL)} holds an unfinished extraction: re-run the "
                f"same extract command to finish it" if os.path.isdir(os.path.join(path, PARTIAL))
                else "; expected a folder written by `tools/feature_bank.py extract`")
        raise BankError(f"{path}: missing header {HEADER}, so this is not a complete feature "
                        f"bank{hint}")
    header = _read_json(hpath)
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


# ====================================================================== models and datasets

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model_state(path: str) -> dict:
    """A model state_dict from model_final.pt, a trainer checkpoint ({"model": ...}) or a
    DDP/compiled model's dict; checked as every weight import is (transfer.read_weights)."""
    out = {}
    for k, v in read_weights(path).items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def default_checkpoint(run_dir: str) -> str:
    """The run's model_final.pt; an unfinished run only through --checkpoint."""
    return final_weights(run_dir, "--checkpoint=")


def run_config(run_dir: str, overrides=()):
    from .config import load_config

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise BankError(f"{run_dir}: no config.yaml; expected a run folder written by "
                        f"launchers/train.py")
    return load_config(path, list(overrides))


def run_class_counts(run_dir: str) -> list[int]:
    """Training-set class counts of a run: from results_per_class.npz (results.json in
    folders written before it existed), else by opening its data."""
    from .results import PER_CLASS, load_per_class
    if os.path.isfile(os.path.join(run_dir, PER_CLASS)):
        return [int(c) for c in load_per_class(run_dir)["class_counts"]]
    path = os.path.join(run_dir, "results.json")
    if os.path.isfile(path):
        counts = _read_json(path).get("class_counts")
        if counts:
            return [int(c) for c in counts]
    from data_pipelines.build import build_data

    return list(build_data(run_config(run_dir).data, eval_splits=()).class_counts)


@dataclass
class RunModel:
    cfg: object
    method: object
    model: object
    checkpoint: str
    class_counts: list
    device: object = None
    data: object = None   # the run's DataBundle (its long-tailed train split)


def load_run_model(run_dir: str, checkpoint: str | None = None, device="cpu") -> RunModel:
    """Rebuild the run's model through its method (so any method works) and load weights."""
    import torch

    from data_pipelines.build import build_data

    from .methods import create_method

    cfg = run_config(run_dir)
    ckpt = os.path.abspath(checkpoint or default_checkpoint(run_dir))
    data = build_data(cfg.data, eval_splits=())
    device = torch.device(device)
    method = create_method(cfg, data, device)
    model = method.model
    try:
        model.load_state_dict(load_model_state(ckpt))
    except RuntimeError as e:
        raise BankError(f"{ckpt}: does not fit the model of {run_dir}/config.yaml "
                        f"({cfg.method.name} / {cfg.model.name}): {str(e)[:400]}") from None
    model.to(device).eval()
    return RunModel(cfg, method, model, ckpt, list(data.class_counts), device, data)


def open_split(data_cfg, split: str, list_file: str | None = None, bundle=None):
    """The split as a dataset with the *evaluation* transform (also for train), plus a spec
    of where it came from. Train without a list is the run's long-tailed subset (taken from
    `bundle`, a DataBundle of the same data config, when given)."""
    from data_pipelines.augment import DEFAULT_STATS, build_transform
    from data_pipelines.build import build_data
    from data_pipelines.datasets import AugmentedDataset
    from data_pipelines.sources import open_source

    if split == "train" and not list_file:
        src = (bundle or build_data(data_cfg, eval_splits=())).train.source
    else:
        lst = list_file or data_cfg.get(f"{split}_list")
        src = open_source(data_cfg["source"], data_cfg["root"], split, lst,
                          num_classes=data_cfg.get("num_classes"))
    mean, std = DEFAULT_STATS[data_cfg["stats"] or data_cfg["source"]]
    transform = build_transform(data_cfg["augment"], False, data_cfg["image_size"], mean, std,
                                len(mean))
    return AugmentedDataset(src, transform), dataset_spec(data_cfg, split, list_file)


def dataset_spec(data_cfg, split: str, list_file: str | None) -> dict:
    """What decides which images, in which order and how preprocessed (not loader knobs)."""
    keep = ("source", "root", "imbalance", "rho", "n_max", "lt_seed", "augment", "image_size",
            "stats", "num_classes")
    spec = {k: data_cfg.get(k) for k in keep}
    lst = list_file or (None if split == "train" else data_cfg.get(f"{split}_list"))
    spec.update(split=split, list=os.path.abspath(lst) if lst else None)
    if split != "train" or list_file:
        for k in ("imbalance", "rho", "n_max", "lt_seed"):
            spec.pop(k)  # the long-tail subsetting only applies to the run's own train split
    return spec


def sample_paths(src) -> np.ndarray:
    """Image path (file sources) or "name[index]" (array sources) of every sample."""
    from data_pipelines.sources import SubsetSource

    idx = np.arange(len(src))
    base = src
    while isinstance(base, SubsetSource):
        idx, base = base.indices[idx], base.base
    if hasattr(base, "full_path"):
        return np.asarray([base.full_path(int(i)) for i in idx], dtype=str)
    return np.asarray([f"{base.name}[{int(i)}]" for i in idx], dtype=str)


def feature_fn(run: RunModel, layer: str = "features"):
    """images -> (B, D) float32 CPU features of `layer`: "features" (the pooled backbone
    output the head sees), "logits" (the method's prediction, e.g. tau-normalized), "head"
    (the model's raw output, e.g. an SSL projection), or any module name (its output,
    spatially averaged)."""
    import torch

    model = run.model
    if layer == "features":
        if hasattr(model, "features"):
            f = model.features
        elif hasattr(model, "backbone"):
            f = model.backbone
        else:
            raise BankError(f"{type(model).__name__} has neither .features nor .backbone; "
                            f"name a layer instead")
    elif layer == "logits":
        def f(x):
            try:
                return run.method.predict(model, x)
            except AttributeError as e:  # e.g. a kNN-evaluated SSL method without its bank
                raise BankError(f"method {run.cfg.method.name!r} cannot predict outside "
                                f"training ({e}); use layer 'features' or 'head'") from None
    elif layer == "head":
        f = model
    else:
        f = _hooked(model, layer)
    channels_last = bool(getattr(run.cfg.model, "channels_last", False))

    @torch.no_grad()
    def forward(images):
        x = images.to(run.device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return f(x).float().flatten(1).cpu()

    return forward


def _hooked(model, layer: str):
    modules = dict(model.named_modules())
    if layer not in modules:
        names = [n for n in modules if n][:30]
        raise BankError(f"layer {layer!r} not in the model; use 'features', 'logits' or a "
                        f"module name such as {', '.join(names)}")

    def f(x):
        box = {}
        handle = modules[layer].register_forward_hook(lambda m, i, o: box.setdefault("y", o))
        try:
            model(x)
        finally:
            handle.remove()
        y = box["y"][0] if isinstance(box["y"], (tuple, list)) else box["y"]
        return y.mean(dim=(2, 3)) if y.dim() == 4 else y

    return f


# ================================================================ chunked, resumable extraction

def _chunk_path(part: str, c: int) -> str:
    return os.path.join(part, f"chunk_{c:06d}.npz")


def _check_manifest(part: str, identity: dict) -> str | None:
    """Create the partial bank's manifest, or say why an existing one is a different bank."""
    mpath = os.path.join(part, MANIFEST)
    if not os.path.isfile(mpath):
        os.makedirs(part, exist_ok=True)
        _write_json(mpath, identity)
        return None
    old = _read_json(mpath)
    diff = [k for k in identity if k != "checkpoint" and old.get(k) != identity[k]]
    if not diff:
        return None
    details = "; ".join(f"{k}: {old.get(k)!r} there, {identity[k]!r} now" for k in diff)
    return (f"{os.path.dirname(part)}: holds a partial bank of another extraction "
            f"(checkpoint {old.get('checkpoint')}); refusing to mix them. Differences: "
            f"{details}. Use another output folder, or delete {part} to start over.")


def _identity_of_complete(out: str, identity: dict):
    """None if `out` holds no finished bank; raise if it holds a different one."""
    if not os.path.isfile(os.path.join(out, HEADER)):
        return None
    header = _read_json(os.path.join(out, HEADER))
    diff = [k for k in identity if k not in ("checkpoint", "chunk_size")
            and header.get(k) != identity[k]]
    if diff:
        raise BankError(f"{out}: already holds a complete bank that differs in "
                        f"{', '.join(diff)}; choose another output folder or delete it")
    return header


def _run_chunk(dataset, rows, forward, batch_size: int, workers: int, dtype: str):
    import torch

    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows),
                                         batch_size=batch_size, num_workers=workers)
    feats, labels = [], []
    for images, y in loader:
        feats.append(forward(images).numpy())
        labels.append(y.numpy())
    return np.concatenate(feats).astype(dtype), np.concatenate(labels).astype(np.int64)


def _save_chunk(path: str, features, labels, rows):
    atomic_write(path, lambda f: np.savez(f, features=features, labels=labels,
                                     indices=np.asarray(rows, dtype=np.int64)))


def extract_bank(out: str, dataset, forward, identity: dict, *, chunk_size: int = 4096,
                 batch_size: int = 256, dtype: str = "float32", workers: int = 0,
                 rank: int = 0, world_size: int = 1, header: dict | None = None,
                 paths=None, progress: bool = True) -> str:
    """Run `forward` over `dataset` chunk by chunk; ranks share the missing chunks.

    `identity` (checkpoint, layer, dataset, ...) is what a resumed run must agree with;
    `header` adds fields to the final header; `paths` is a callable giving sample paths.
    """
    from tqdm import tqdm

    from . import distributed as dist_utils

    if dtype not in DTYPES:
        raise BankError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    identity = {**identity, "count": len(dataset), "chunk_size": int(chunk_size),
                "dtype": dtype}
    if len(dataset) == 0:
        raise BankError(f"{out}: the dataset is empty")
    if _identity_of_complete(out, identity) is not None:
        return out
    part = os.path.join(out, PARTIAL)
    nchunks = math.ceil(len(dataset) / chunk_size)
    todo = None
    if rank == 0:
        err = _check_manifest(part, identity)
        todo = err or [c for c in range(nchunks) if not os.path.isfile(_chunk_path(part, c))]
    todo = dist_utils.broadcast_object(todo)
    if isinstance(todo, str):
        raise BankError(todo)
    mine = todo[rank::world_size]
    for c in tqdm(mine, desc=f"extract {os.path.basename(out)}", unit="chunk",
                  disable=not progress or rank != 0):
        rows = list(range(c * chunk_size, min(len(dataset), (c + 1) * chunk_size)))
        feats, labels = _run_chunk(dataset, rows, forward, batch_size, workers, dtype)
        _save_chunk(_chunk_path(part, c), feats, labels, rows)
    dist_utils.barrier()
    if rank == 0:
        _assemble(out, part, nchunks, identity, header or {}, paths)
    dist_utils.barrier()
    return out


def _assemble(out: str, part: str, nchunks: int, identity: dict, extra: dict, paths):
    """Chunks -> final arrays (features via a memmap, so a bank larger than RAM works)."""
    n = identity["count"]
    feats = labels = None
    tmp = os.path.join(out, f"features.npy.tmp.{os.getpid()}")
    for c in range(nchunks):
        path = _chunk_path(part, c)
        if not os.path.isfile(path):
            raise BankError(f"{path}: missing after every rank finished; re-run extract")
        with np.load(path, allow_pickle=False) as z:
            f, y, rows = z["features"], z["labels"], z["indices"]
        if len(rows) == 0 or rows[0] != c * identity["chunk_size"] or len(f) != len(rows):
            raise BankError(f"{path}: holds rows {rows[:1]}.. that chunk {c} should not; delete "
                            f"{part} and extract again")
        if feats is None:
            feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=f.dtype,
                                              shape=(n, f.shape[1]))
            labels = np.empty(n, dtype=np.int64)
        feats[rows[0]:rows[-1] + 1] = f
        labels[rows[0]:rows[-1] + 1] = y
    feats.flush()
    dim = feats.shape[1]
    del feats
    os.replace(tmp, os.path.join(out, "features.npy"))
    sample_ids = paths() if callable(paths) else paths
    sample_ids = np.asarray(sample_ids if sample_ids is not None
                            else [f"[{i}]" for i in range(n)], dtype=str)
    num_classes = int(extra.get("num_classes") or labels.max() + 1)
    header = {**make_header(n, dim, identity["dtype"], num_classes, labels),
              **{k: v for k, v in identity.items() if k != "dtype"}, **extra}
    _finish_bank(out, labels, np.arange(n, dtype=np.int64), sample_ids, header)
    shutil.rmtree(part)


def extract_run(run_dir: str, out: str, split: str = "test", layer: str = "features",
                checkpoint: str | None = None, list_file: str | None = None, overrides=(),
                dtype: str = "float32", chunk_size: int = 4096, batch_size: int | None = None,
                workers: int | None = None, device: str = "auto", progress: bool = True) -> str:
    """Extract `layer` features of a run's checkpoint on one split (or list file).

    Under torchrun (or `extract_run_ddp`) every rank takes a share of the chunks. `overrides`
    ("data.source=svhn", ...) change only the dataset read, never the model.
    """
    import torch

    from . import distributed as dist_utils

    ckpt = os.path.abspath(checkpoint or default_checkpoint(run_dir))
    data_cfg = run_config(run_dir, overrides).data
    identity = {"checkpoint": ckpt, "checkpoint_sha256": file_sha256(ckpt), "layer": layer,
                "dataset": dataset_spec(data_cfg, split, list_file)}
    if _precheck(out, {**identity, "chunk_size": int(chunk_size), "dtype": dtype}):
        return out  # finished before: no need to build the model
    info = dist_utils.setup(device)
    if info.device.type == "cpu" and info.world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    run = load_run_model(run_dir, ckpt, info.device)
    dataset, _ = open_split(data_cfg, split, list_file, None if overrides else run.data)
    header = {"run_dir": os.path.abspath(run_dir), "method": run.cfg.method.name,
              "model": run.cfg.model.name, "num_classes": dataset.num_classes,
              "train_class_counts": run.class_counts, "data_config": dict(data_cfg),
              "world_size": info.world_size}
    return extract_bank(out, dataset, feature_fn(run, layer), identity, chunk_size=chunk_size,
                        batch_size=batch_size or run.cfg.data.eval_batch_size, dtype=dtype,
                        workers=run.cfg.data.workers if workers is None else workers,
                        rank=info.rank, world_size=info.world_size, header=header,
                        paths=lambda: sample_paths(dataset.source), progress=progress)


def _precheck(out: str, identity: dict) -> bool:
    """Before the model is built: True if `out` is this bank, finished; raise if `out` holds
    another bank, finished or partial. (extract_bank checks again, sample count included.)"""
    if _identity_of_complete(out, identity) is not None:
        return True
    mpath = os.path.join(out, PARTIAL, MANIFEST)
    if os.path.isfile(mpath):
        err = _check_manifest(os.path.dirname(mpath), {**_read_json(mpath), **identity})
        if err:
            raise BankError(err)
    return False


def extract_run_ddp(nproc: int, **kwargs) -> str:
    """`extract_run` on `nproc` local processes (gloo on CPU, NCCL on GPUs)."""
    from . import distributed as dist_utils

    dist_utils.run_local(extract_run, nproc, kwargs)
    return kwargs["out"]


def run_bank_path(run_dir: str, split: str, layer: str, checkpoint: str,
                  list_file: str | None = None, bank_root: str | None = None) -> str:
    """RUN/feature_banks/<checkpoint name>-<split or list name>-<layer>."""
    name = os.path.splitext(os.path.basename(checkpoint))[0]
    tag = os.path.splitext(os.path.basename(list_file))[0] if list_file else split
    return os.path.join(bank_root or os.path.join(run_dir, "feature_banks"),
                        f"{name}-{tag}-{layer}")


def run_bank(run_dir: str, split: str, layer: str = "features", checkpoint: str | None = None,
             bank_root: str | None = None, list_file: str | None = None, **kw) -> Bank:
    """The bank of a run folder's checkpoint on `split`, extracted once and cached."""
    ckpt = checkpoint or default_checkpoint(run_dir)
    out = run_bank_path(run_dir, split, layer, ckpt, list_file, bank_root)
    extract_run(run_dir, out, split=split, layer=layer, checkpoint=ckpt, list_file=list_file,
                **kw)  # returns at once when the bank exists
    return load_bank(out)


# ================================================================================ faiss search

def use_gpu(device: str = "auto") -> bool:
    """faiss-gpu with a visible GPU -> GPU; otherwise CPU ("gpu" without one is an error)."""
    faiss = require("faiss", "faiss-cpu (or faiss-gpu on GPU machines)")
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device {device!r}: choose auto, cpu or gpu")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "gpu" and gpus == 0:
        raise RuntimeError("device 'gpu' asked for, but faiss sees no GPU (faiss-cpu installed, "
                           "or no CUDA device)")
    return device != "cpu" and gpus > 0


def normalized(x: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (cosine similarity = inner product)."""
    out = np.empty(x.shape, dtype=np.float32)
    for a in range(0, len(x), batch):
        b = np.asarray(x[a:a + batch], dtype=np.float32)
        out[a:a + batch] = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return out


@dataclass
class Index:
    """A faiss index plus what must outlive it (GPU resources) and how it was built."""
    index: object
    kind: str
    gpu: bool
    nlist: int = 0
    nprobe: int = 0
    normalize: bool = False
    keep: list = field(default_factory=list)

    def prep(self, x: np.ndarray) -> np.ndarray:
        """float32, C-contiguous, unit rows if the index is cosine: done per batch, so a
        float16 memmap bank never needs a whole float32 copy besides faiss's own."""
        return normalized(x) if self.normalize else np.ascontiguousarray(x, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int, batch: int = 16384):
        sims, ids = [], []
        for a in range(0, len(queries), batch):
            s, i = self.index.search(self.prep(queries[a:a + batch]), k)
            sims.append(s)
            ids.append(i)
        return np.concatenate(sims), np.concatenate(ids)


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists, but at least 39 training points per list (faiss's own minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(ref: np.ndarray, kind: str = "flat", metric: str = "ip", nlist: int | None = None,
                nprobe: int = 16, device: str = "auto", seed: int = 0, normalize: bool = False,
                batch: int = 65536, float16: bool | None = None) -> Index:
    """Exact ("flat") or inverted-file ("ivf") index over `ref`; with `normalize` (cosine)
    rows of `ref` and of later queries are scaled to unit norm batch by batch.

    A GPU index lives on this process's CUDA device (the one the engine set), not on GPU 0,
    where every process of a node would pile its index. `float16` stores the vectors in
    half precision on the GPU (half the memory, for large banks); by default it follows the
    bank: a float16 bank loses nothing by it. Ignored on CPU."""
    faiss = require("faiss", "faiss-cpu (or faiss-gpu on GPU machines)")
    n, d = ref.shape
    ip = {"ip": True, "l2": False}[metric]
    flat = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
    keep = [flat]
    if kind == "flat":
        index, nlist = flat, 0
    elif kind == "ivf":
        nlist = nlist or default_nlist(n)
        index = faiss.IndexIVFFlat(flat, d, nlist,
                                   faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    else:
        raise ValueError(f"index kind {kind!r}: choose flat or ivf")
    out = Index(None, kind, use_gpu(device), nlist, 0, normalize, keep)
    if out.gpu:
        import torch

        res = faiss.StandardGpuResources()
        keep += [index, res]
        opts = faiss.GpuClonerOptions()
        opts.useFloat16 = bool(ref.dtype == np.float16 if float16 is None else float16)
        gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.index_cpu_to_gpu(res, gpu, index, opts)
    if kind == "ivf":
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))  # k-means sample
        index.train(out.prep(ref[take]))
        out.nprobe = min(nprobe, nlist)
        _set_nprobe(faiss, index, out.nprobe, out.gpu)
    for a in range(0, n, batch):
        index.add(out.prep(ref[a:a + batch]))
    out.index = index
    return out


def _set_nprobe(faiss, index, nprobe: int, gpu: bool):
    if gpu:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        index.nprobe = nprobe


def search_excluding_self(index: Index, queries: np.ndarray, k: int, self_ids=None):
    """Top-k neighbours; with `self_ids` (the query's own row in the reference) that row is
    dropped, so a bank can be searched against itself (leave-one-out)."""
    have = index.index.ntotal - (self_ids is not None)
    if not 1 <= k <= have:
        raise BankError(f"k = {k} neighbours asked for, but the reference holds {have} "
                        f"candidates per query")
    if self_ids is None:
        return index.search(queries, k)
    sims, ids = index.search(queries, k + 1)
    self_ids = np.asarray(self_ids).reshape(-1, 1)
    hit = ids == self_ids
    drop = np.where(hit.any(1), hit.argmax(1), k)  # not found (duplicates): drop the last
    keep = np.ones_like(ids, dtype=bool)
    keep[np.arange(len(ids)), drop] = False
    return sims[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the exact top-k neighbours that the approximate search also returned."""
    k = exact_ids.shape[1]
    hits = [len(set(a[a >= 0]) & set(e)) for a, e in zip(approx_ids, exact_ids)]
    return float(np.sum(hits) / (k * len(exact_ids)))


# ============================================================================ kNN classification

def knn_vote(sims: np.ndarray, ids: np.ndarray, ref_labels: np.ndarray, num_classes: int,
             temperature: float) -> np.ndarray:
    """Weighted vote: class score = sum of exp(cos / T) over the neighbours of that class.

    exp((cos - 1) / T) is used: the same ratios, without overflow for small T. Missing
    neighbours (id -1, from an IVF search that found fewer than k) do not vote.
    """
    valid = ids >= 0
    labels = np.asarray(ref_labels)[np.where(valid, ids, 0)]
    weights = np.where(valid, np.exp((sims.astype(np.float64) - 1.0) / temperature), 0.0)
    scores = np.zeros((len(ids), num_classes))
    rows = np.arange(len(ids))
    for j in range(ids.shape[1]):
        scores[rows, labels[:, j]] += weights[:, j]
    return scores.argmax(1)


def same_bank(a: Bank, b: Bank) -> bool:
    return os.path.realpath(a.path) == os.path.realpath(b.path)


def knn_evaluate(query: Bank, ref: Bank, k: int = 20, temperature: float = 0.07,
                 index: str = "flat", nlist: int | None = None, nprobe: int = 16,
                 device: str = "auto", recall_queries: int = 1000, many: int = 100,
                 few: int = 20, seed: int = 0) -> dict:
    """kNN accuracy of `query` against `ref` (cosine, weighted vote), overall and per shot
    split of the model's training counts; an IVF index also reports its recall@k against
    exact search on up to `recall_queries` queries."""
    import time

    from .metrics import evaluate_predictions

    check_compatible(query, ref)
    q, r = query.features, ref.features
    self_ids = np.arange(len(q)) if same_bank(query, ref) else None
    t0 = time.perf_counter()
    idx = build_index(r, index, nlist=nlist, nprobe=nprobe, device=device, seed=seed,
                      normalize=True)
    build_s = time.perf_counter() - t0
    sims, ids = search_excluding_self(idx, q, k, self_ids)
    search_s = time.perf_counter() - t0 - build_s
    preds = knn_vote(sims, ids, ref.labels, ref.num_classes, temperature)
    m = evaluate_predictions(preds, query.labels, ref.num_classes, ref.train_class_counts,
                             many=many, few=few)
    out = {"k": k, "temperature": temperature, "index": index, "gpu": idx.gpu,
           "leave_one_out": self_ids is not None, "queries": len(q), "references": len(r),
           "build_seconds": round(build_s, 3), "search_seconds": round(search_s, 3),
           **{key: m[key] for key in ("top1", "balanced_top1", "balanced_error", "many",
                                      "medium", "few", "per_class_acc")}}
    if index == "ivf":
        out.update(nlist=idx.nlist, nprobe=idx.nprobe,
                   recall=ivf_recall(q, r, ids, k, self_ids, recall_queries, seed))
    return out


def ivf_recall(q, r, approx_ids, k, self_ids, n: int, seed: int = 0) -> float:
    rows = np.sort(np.random.default_rng(seed).choice(len(q), min(n, len(q)), replace=False))
    exact = build_index(r, "flat", device="auto", normalize=True)
    sub_self = None if self_ids is None else self_ids[rows]
    _, exact_ids = search_excluding_self(exact, q[rows], k, sub_self)
    return recall_at_k(approx_ids[rows], exact_ids)


# ======================================================================= neighbours and leakage

def nearest_neighbors(query: Bank, ref: Bank, rows, k: int = 8) -> list[dict]:
    """For query rows: their k nearest reference samples (label, cosine distance, path)."""
    check_compatible(query, ref)
    rows = np.asarray(rows, dtype=np.int64)
    idx = build_index(ref.features, "flat", normalize=True)
    sims, ids = search_excluding_self(idx, query.features[rows], k,
                                      rows if same_bank(query, ref) else None)
    return [{"row": int(r), "label": int(query.labels[r]), "path": str(query.paths[r]),
             "neighbors": [{"row": int(j), "label": int(ref.labels[j]),
                            "distance": float(1.0 - s), "path": str(ref.paths[j])}
                           for s, j in zip(srow, irow) if j >= 0]}
            for r, srow, irow in zip(rows, sims, ids)]


def head_tail_classes(counts, many: int = 100, few: int = 20, head=None, tail=None):
    """(head, tail, rule): many-/few-shot classes by default; when one of them is empty (e.g.
    a mild imbalance), the most / least frequent third of the classes. Explicit lists win."""
    from .metrics import shot_split

    counts = list(counts)
    if head is not None and tail is not None:
        return sorted(head), sorted(tail), "given"
    split = shot_split(counts, many=many, few=few)
    if split["many"] and split["few"]:
        h, t, rule = split["many"], split["few"], f"many-shot (>{many}) / few-shot (<{few})"
    else:
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        third = max(1, len(counts) // 3)
        h, t, rule = sorted(order[:third]), sorted(order[-third:]), "most / least frequent third"
    return sorted(head if head is not None else h), sorted(tail if tail is not None else t), rule


def describe_ids(ids, most: int = 12) -> str:
    """A class list for a caption: in full when short, else its size and ends."""
    ids = list(ids)
    if len(ids) <= most:
        return str(ids)
    return f"{len(ids)} classes [{ids[0]}, {ids[1]}, ..., {ids[-1]}]"


def leakage_from_neighbors(query_labels, nbr_labels, head, tail, num_classes: int) -> dict:
    """Per tail class: share of its queries whose neighbours are mostly (> half) head-class
    samples, the mean share of head neighbours and of own-class neighbours, and the head
    class its neighbours land in most."""
    query_labels, nbr_labels = np.asarray(query_labels), np.asarray(nbr_labels)
    is_head = np.isin(nbr_labels, head)
    out = {}
    for c in tail:
        mine = query_labels == c
        if not mine.any():
            out[int(c)] = {"samples": 0, "leaked_share": None}
            continue
        head_frac = is_head[mine].mean(1)
        hits = nbr_labels[mine][is_head[mine]]
        top = np.bincount(hits, minlength=num_classes).argmax() if hits.size else None
        out[int(c)] = {"samples": int(mine.sum()),
                       "leaked_share": float((head_frac > 0.5).mean()),
                       "head_neighbor_share": float(head_frac.mean()),
                       "own_class_neighbor_share": float((nbr_labels[mine] == c).mean()),
                       "top_head_class": None if top is None else int(top)}
    return out


def class_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Unit-norm mean of the unit-norm features of each class (NaN rows for absent ones)."""
    x = normalized(features)
    cent = np.full((num_classes, x.shape[1]), np.nan, dtype=np.float64)
    for c in range(num_classes):
        if (labels == c).any():
            m = x[labels == c].mean(0)
            cent[c] = m / max(np.linalg.norm(m), 1e-12)
    return cent


def centroid_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine distance between every centroid of `a` and every centroid of `b`."""
    return 1.0 - a @ b.T


def leakage_report(query: Bank, ref: Bank, k: int = 10, many: int = 100, few: int = 20,
                   head=None, tail=None) -> dict:
    """How far tail-class queries fall among head-class references (the paper's "leakage"),
    with the class-centroid distances that explain it."""
    check_compatible(query, ref)
    head, tail, rule = head_tail_classes(ref.train_class_counts, many, few, head, tail)
    idx = build_index(ref.features, "flat", normalize=True)
    self_ids = np.arange(len(query)) if same_bank(query, ref) else None
    _, ids = search_excluding_self(idx, query.features, k, self_ids)
    per_class = leakage_from_neighbors(query.labels, ref.labels[ids], head, tail,
                                       ref.num_classes)
    ref_c = class_centroids(ref.features, ref.labels, ref.num_classes)
    q_c = class_centroids(query.features, query.labels, ref.num_classes)
    dist = centroid_distances(ref_c, ref_c)
    q_to_ref = centroid_distances(q_c, ref_c)
    for c, row in per_class.items():
        near = min(head, key=lambda h: dist[c, h])
        row.update(nearest_head_class=int(near),
                   centroid_distance_to_nearest_head=_f(dist[c, near]),
                   query_to_own_centroid=_f(q_to_ref[c, c]),
                   query_to_nearest_head_centroid=_f(q_to_ref[c, near]))
    return {"k": k, "head": head, "tail": tail, "rule": rule, "per_class": per_class,
            "centroid_distances": [[_f(v) for v in r] for r in dist]}


def _f(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


# ================================================================== classifier weights, plots

def classifier_weight_norms(state: dict, key: str | None = None) -> tuple[np.ndarray, str]:
    """L2 norm of each class's weight vector: larger for head classes after plain training,
    which is what tau-normalization corrects."""
    keys = [key] if key else [k for k in ("head.fc.weight", "head.weight", "fc.weight")
                              if k in state]
    if not keys or keys[0] not in state:
        two_d = [k for k, v in state.items() if getattr(v, "ndim", 0) == 2]
        raise BankError(f"no classifier weight {key or 'head.fc.weight / head.weight'} in the "
                        f"checkpoint; 2-D weights present: {', '.join(two_d[-5:])} (use --key)")
    w = state[keys[0]].detach().float().cpu().numpy()
    return np.linalg.norm(w, axis=1), keys[0]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_weight_norms(norms, class_counts, path: str, title: str = "", many: int = 100,
                      few: int = 20) -> str:
    from .metrics import shot_split

    fig = _figure((8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    for name, ids in shot_split(class_counts, many=many, few=few).items():
        if ids:
            ax.bar(ids, [norms[c] for c in ids], color=colors[name],
                   label=f"{name}-shot ({len(ids)})")
    ax.set_xlabel("class (training images, head first)")
    ax.set_ylabel("classifier weight norm ||w_c||")
    twin = ax.twinx()
    twin.plot(range(len(class_counts)), class_counts, "k.--", label="training images")
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    ax.legend(loc="lower left", framealpha=0.9)
    ax.set_title(title or "per-class classifier weight norms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def bank_source(bank: Bank):
    """Re-open the dataset a bank was extracted from (for showing its images)."""
    spec = bank.header.get("dataset") or {}
    data_cfg = bank.header.get("data_config")
    if not data_cfg:
        raise BankError(f"{bank.path}: the header has no data_config, so its images cannot be "
                        f"shown (banks not made by extract)")
    dataset, _ = open_split(data_cfg, spec["split"], spec.get("list"))
    if len(dataset) != bank.header["count"]:
        raise BankError(f"{bank.path}: the dataset now has {len(dataset)} samples, the bank "
                        f"{bank.header['count']}: it changed since extraction")
    return dataset.source


def as_image(img) -> np.ndarray:
    """uint8 CHW tensor or PIL image -> HxW or HxWx3 array for imshow."""
    arr = np.asarray(img.numpy().transpose(1, 2, 0) if hasattr(img, "numpy") else img)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr


def plot_neighbor_grid(results: list[dict], query: Bank, ref: Bank, path: str,
                       class_names=None) -> str:
    """One row per query: the query image, then its neighbours, titled label / distance;
    neighbours of another class are framed red."""
    qsrc, rsrc = bank_source(query), bank_source(ref)
    k = max(len(r["neighbors"]) for r in results)
    fig = _figure((1.6 * (k + 1), 1.8 * len(results)))
    name = (lambda c: class_names[c]) if class_names else str
    for i, r in enumerate(results):
        cells = [(qsrc.load(int(query.indices[r["row"]])), f"query {name(r['label'])}", "black")]
        cells += [(rsrc.load(int(ref.indices[n["row"]])),
                   f"{name(n['label'])} d={n['distance']:.3g}",
                   "green" if n["label"] == r["label"] else "red") for n in r["neighbors"]]
        for j, (img, text, color) in enumerate(cells):
            ax = fig.add_subplot(len(results), k + 1, i * (k + 1) + j + 1)
            arr = as_image(img)
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            ax.set_title(text, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_color(color)
                side.set_linewidth(2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
