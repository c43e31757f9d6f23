"""Feature banks of a run: the extraction service's resumable chunked pass
(trainer/extraction.py: chunk c = samples [c*S, (c+1)*S), written atomically to .partial/ by
whichever rank owns it, so a killed extraction redoes only the missing chunks, with any number
of ranks) assembled into a bank folder (banks/files.py), and cached per run and checkpoint.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from .. import distributed as dist_utils
from ..extraction import MANIFEST, assemble_rows, check_manifest, read_json, run_chunks
from .files import DTYPES, HEADER, PARTIAL, Bank, BankError, finish_bank, load_bank, make_header
from .runs import (dataset_spec, default_checkpoint, feature_fn, file_sha256, load_run_model,
                   open_split, run_config, sample_paths)

def _identity_of_complete(out: str, identity: dict):
    """None if `out` holds no finished bank; raise if it holds a different one."""
    if not os.path.isfile(os.path.join(out, HEADER)):
        return None
    header = read_json(os.path.join(out, HEADER))
    diff = [k for k in identity if k not in ("checkpoint", "chunk_size")
            and header.get(k) != identity[k]]
    if diff:
        raise BankError(f"{out}: already holds a complete bank that differs in "
                        f"{', '.join(diff)}; choose another output folder or delete it")
    return header


def extract_bank(out: str, dataset, forward, identity: dict, *, chunk_size: int = 4096,
                 batch_size: int = 256, dtype: str = "float32", workers: int = 0,
                 rank: int = 0, world_size: int = 1, header: dict | None = None,
                 paths=None, progress: bool = True) -> str:
    """Run `forward` over `dataset` chunk by chunk (extraction.run_chunks); ranks share the
    missing chunks; rank 0 assembles the bank chunk by chunk through a memory map.

    `identity` (checkpoint, layer, dataset, ...) is what a resumed run must agree with;
    `header` adds fields to the final header; `paths` is a callable giving sample paths.
    """
    if dtype not in DTYPES:
        raise BankError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    identity = {**identity, "count": len(dataset), "chunk_size": int(chunk_size),
                "dtype": dtype}
    if len(dataset) == 0:
        raise BankError(f"{out}: the dataset is empty")
    if _identity_of_complete(out, identity) is not None:
        return out
    part = os.path.join(out, PARTIAL)
    run_chunks(part, dataset, forward, identity, chunk_size=chunk_size, batch_size=batch_size,
               dtype=dtype, workers=workers, rank=rank, world_size=world_size,
               progress=progress, desc=f"extract {os.path.basename(out)}")
    if rank == 0:
        _assemble(out, part, identity, header or {}, paths)
    dist_utils.barrier()
    return out


def _assemble(out: str, part: str, identity: dict, extra: dict, paths):
    """Chunks -> final arrays (features via a memmap, so a bank larger than RAM works)."""
    n = identity["count"]
    feats, labels, present = assemble_rows(part, n, os.path.join(out, "features.npy"))
    if not present.all():
        missing = np.flatnonzero(~present)
        raise BankError(f"{part}: rows {missing[:5].tolist()}.. missing after every rank "
                        f"finished; re-run extract")
    dim = feats.shape[1]
    del feats
    sample_ids = paths() if callable(paths) else paths
    sample_ids = np.asarray(sample_ids if sample_ids is not None
                            else [f"[{i}]" for i in range(n)], dtype=str)
    num_classes = int(extra.get("num_classes") or labels.max() + 1)
    header = {**make_header(n, dim, identity["dtype"], num_classes, labels),
              **{k: v for k, v in identity.items() if k != "dtype"}, **extra}
    finish_bank(out, labels, np.arange(n, dtype=np.int64), sample_ids, header)
    shutil.rmtree(part)


def extract_run(run_dir: str, out: str, split: str = "test", layer: str = "features",
                checkpoint: str | None = None, list_file: str | None = None, overrides=(),
                dtype: str = "float32", chunk_size: int = 4096, batch_size: int | None = None,
                workers: int | None = None, device: str = "auto", progress: bool = True) -> str:
    """Extract `layer` features of a run's checkpoint on one split (or list file).

    Under torchrun (or `extract_run_ddp`) every rank takes a share of the chunks. `overrides`
    ("data.source=svhn", ...) change only the dataset read, never the model.
    """
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
        err = check_manifest(os.path.dirname(mpath), {**read_json(mpath), **identity})
        if err:
            raise BankError(err)
    return False


def extract_run_ddp(nproc: int, **kwargs) -> str:
    """`extract_run` on `nproc` local processes (gloo on CPU, NCCL on GPUs)."""
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
