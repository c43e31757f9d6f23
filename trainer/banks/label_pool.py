"""Pseudo-labels of a run's unlabeled pool from any of its checkpoints (tools/pseudo_label.py):
the same predictor, row files and assembly as the `pseudo_label` stage (trainer/pseudo_labels.py),
with the rows made by the extraction service's resumable chunked pass over the pool.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from ltrainer.data_pipelines.sources import SubsetSource
from ltrainer.data_pipelines.unlabeled_pool import build_pool

from .. import distributed as dist_utils
from .. import pseudo_labels
from ..extraction import run_chunks
from .runs import default_checkpoint, file_sha256, load_run_model, run_config


def label_run(run_dir: str, out: str, checkpoint: str | None = None, overrides=(),
              threshold: float = 0.0, top_k: int = 0, save_probs: bool = False,
              batch_size: int | None = None, workers: int | None = None, device: str = "auto",
              chunk_size: int = 1024, progress: bool = True) -> dict | None:
    """Pseudo-label the pool of a run's config (`overrides` such as "semi.rho_u=1" or
    "semi.pool_file=..." choose another) with one of its checkpoints; write `out` (.npz) and
    return the accuracy report (on rank 0; None on the others).

    Sharded over the ranks (torchrun, or `distributed.run_local`), in chunks that a killed run
    does not redo, with a progress bar on rank 0; the chunk folder is removed at the end.
    """
    ckpt = os.path.abspath(checkpoint or default_checkpoint(run_dir))
    cfg = run_config(run_dir, overrides)
    pool = build_pool(cfg.data, cfg.semi)
    info = dist_utils.setup(device)
    if info.device.type == "cpu" and info.world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    run = load_run_model(run_dir, ckpt, info.device)
    predict = pseudo_labels.predictor(run.model, pool.num_classes, save_probs)

    @torch.no_grad()
    def forward(images):
        return predict(images.to(info.device)).cpu()

    # the rows' labels must be classes: hidden labels (-1 outside the task) stay in `pool`
    blind = SubsetSource(pool.source, np.arange(len(pool)), labels=np.zeros(len(pool), np.int64),
                         num_classes=pool.num_classes)
    part = os.path.splitext(out)[0] + ".rows"
    identity = {"checkpoint": ckpt, "checkpoint_sha256": file_sha256(ckpt),
                "layer": "pseudo_label_rows", "save_probs": bool(save_probs),
                "pool": pool.fingerprint, "count": len(pool), "chunk_size": int(chunk_size)}
    run_chunks(part, run.data.make_dataset(blind, False), forward, identity,
               chunk_size=chunk_size, batch_size=batch_size or cfg.data.eval_batch_size,
               workers=cfg.data.workers if workers is None else workers, rank=info.rank,
               world_size=info.world_size, progress=progress, desc="pseudo-label")
    report = None
    if info.is_main:
        pl = pseudo_labels.from_row_files(part, len(pool), pool.num_classes, pool.hidden,
                                          threshold, top_k, save_probs,
                                          pool_fingerprint=pool.fingerprint, checkpoint=ckpt,
                                          pool=pool.summary())
        pseudo_labels.save(out, pl)
        report = pseudo_labels.accuracy_report(pl)
        del pl
        shutil.rmtree(part)
    dist_utils.barrier()
    return report
