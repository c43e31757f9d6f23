"""The device-side input path: uint8 batches to the training device, the rest done there.

A loader whose transforms stop at uint8 (``crops_only`` in augment.py) is wrapped by
`StagedLoader`: each batch is copied to the device on a side stream from pinned memory (the
DataLoader pins it) while the previous batch trains, and batch_aug.BatchAugment (MoCo's
colour and blur, the seeded flip, normalisation) runs on the device on that stream: 4x less to
copy than float32 and no CPU time for the colour maths. The pattern is timm's PrefetchLoader
(timm/data/loader.py): one batch ahead, the compute stream waits for the side stream, and the
tensors are marked as used by the compute stream (record_stream) so the caching allocator
does not hand their memory back to the side stream too early. Nothing here waits for the
device (no .item(), no synchronize): the host only queues work.

On a CPU (device None or 'cpu') the same class runs the stage in the loop, which is also what
the CPU tests exercise.
"""
from __future__ import annotations

import numpy as np
import torch


def batch_seeds(keys) -> np.ndarray | None:
    """Per-sample seeds of a sampler's keys ((index, seed) pairs), or None (plain indices)."""
    if keys and isinstance(keys[0], tuple):
        return np.asarray([k[1] for k in keys], dtype=np.int64)
    return None


class StagedLoader:
    """Batches ``(stage(x) on device, y on device)`` from a loader of uint8 ``(x, y)``.

    The seeds of batch b are the sampler's keys b * batch_size ... (the DataLoader draws them
    in that order), or the inner loader's ``batch_seeds`` when it drops bad images.
    ``batch_indices`` and ``skipped`` are the inner loader's, for the batch handed out last.
    """

    def __init__(self, loader, stage, sampler, batch_size: int, device=None):
        self.loader, self.stage, self.sampler = loader, stage, sampler
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_indices = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def skipped(self) -> int:
        return getattr(self.loader, "skipped", 0)

    def _inner(self):
        """(x, y, seeds, batch_indices) from the inner loader, on the host."""
        seeds = batch_seeds(list(iter(self.sampler))) if self.stage.random else None
        bs = self.batch_size
        for b, (x, y) in enumerate(self.loader):
            own = getattr(self.loader, "batch_seeds", None)
            s = own if own is not None else (None if seeds is None else seeds[b * bs:b * bs + len(y)])
            yield x, y, s, getattr(self.loader, "batch_indices", None)

    def _prepare(self, x, y, seeds):
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return self.stage(x, seeds), y

    def __iter__(self):
        if self.device.type != "cuda":
            for x, y, seeds, ids in self._inner():
                self.batch_indices = ids
                yield self._prepare(x, y, seeds)
            return
        stream = torch.cuda.Stream(device=self.device)
        current = torch.cuda.current_stream(self.device)
        ready = None
        for x, y, seeds, ids in self._inner():
            with torch.cuda.stream(stream):
                nxt = (*self._prepare(x, y, seeds), ids)
            if ready is not None:
                yield self._hand_out(ready, current)
            current.wait_stream(stream)
            ready = nxt
        if ready is not None:
            yield self._hand_out(ready, current)

    def _hand_out(self, ready, current):
        x, y, ids = ready
        x.record_stream(current)
        y.record_stream(current)
        self.batch_indices = ids
        return x, y
