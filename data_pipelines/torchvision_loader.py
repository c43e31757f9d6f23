"""DataLoader construction with seeded workers.

The reference code never seeded its workers; here python ``random``, numpy and torch are
seeded in every worker from (seed, worker_id), so any library randomness outside the
per-sample seeds is reproducible too. Image files with an ImageNet-style recipe go through
decode.py (crop-sized decoding, one batched fetch per batch, written into reused batch memory
by batch_ring.py) when the caller passes the recipe's AugmentSpec; everything else through the
dataset's own transform.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from .samplers import mix_seeds


class WorkerSeeder:
    """worker_init_fn (a picklable class, not a closure, so spawn start methods work too)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __call__(self, worker_id: int) -> None:
        s = mix_seeds(self.seed, worker_id, 0x3057) >> 1
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        torch.manual_seed(s)


def build_torchvision_loader(dataset, sampler, batch_size: int, workers: int, seed: int,
                             pin_memory: bool = False, drop_last: bool = False,
                             spec=None, reuse_batches: bool = True):
    """DataLoader over ``dataset`` in ``sampler`` order; ``batch_size`` is the per-rank batch.
    ``spec`` (loaders.AugmentSpec of the dataset's recipe) enables the fast decode path; with
    workers and no pinning its batches come through a batch_ring.RingLoader (reused memory;
    ``reuse_batches=False``: a fresh segment each batch, as torch does)."""
    if batch_size < 1:
        raise ValueError(f"build_torchvision_loader: expected batch_size >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"build_torchvision_loader: expected workers >= 0, got {workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed) & ((1 << 63) - 1))
    collate = None
    if spec is not None:
        from . import decode

        if decode.supports(dataset, spec):
            dataset, collate = decode.CropDecodeDataset(dataset, spec), decode.collate_batch

    def make(batch_sampler=None):
        batched = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(
            batch_size=batch_size, sampler=sampler, drop_last=drop_last)
        return DataLoader(dataset, num_workers=workers, pin_memory=pin_memory,
                          worker_init_fn=WorkerSeeder(seed), generator=generator,
                          persistent_workers=workers > 0, collate_fn=collate, **batched)

    if collate is None or workers == 0 or pin_memory or not reuse_batches:
        return make()
    # decode.py's batches into reused shared memory (batch_ring.py): `prefetch_factor` (2)
    # batches per worker in flight, and up to 4 held by the loop (the batch in use, the one
    # before it until the loop variable moves on, references inside zip / enumerate)
    from .batch_ring import RingLoader, ring_memory

    dataset.ring = ring_memory(2 * workers + 4, (batch_size, spec.channels, spec.size,
                                                 spec.size))
    return RingLoader(make, BatchSampler(sampler, batch_size, drop_last), dataset.ring,
                      sampler=sampler)
