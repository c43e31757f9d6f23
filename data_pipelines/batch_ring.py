"""Batch memory that DataLoader workers reuse, for decode.py's batched path.

Why: a DataLoader worker puts every batch into a fresh shared-memory segment. A float32 batch
of 64 images at 224 px is 38.5 MB: 9,408 pages that the kernel allocates and zeroes on their
first write, for every batch (on these 2-core VMs, `tools/bench_loaders.py --ablate` on its
photo set: 2.14 CPU ms an image with fresh segments against 1.60 with this). Here the training
process creates the batch slots in shared memory once (the workers inherit or map them), and:

- the DataLoader's batch sampler (`RingBatches`) runs in the training process as each batch is
  dispatched: it gives the batch a free slot, sent with its keys (`SlotTask`);
- the worker writes the batch into that slot and returns only the slot number;
- `RingLoader` hands out a tensor on the slot, and the slot is free again once that tensor and
  every view of it are garbage-collected (a weakref finalizer; autograd's saved inputs are such
  views, so a batch stays put until its backward pass is done).

With no free slot (a consumer that keeps many batches) the batch goes the old way, a fresh
segment. A batch left in flight when an epoch is abandoned (``break``) gets its slot back when
the next epoch starts: by then the DataLoader has waited for every worker to finish the old
tasks. What does not keep a slot: ``batch.numpy()`` and ``batch.untyped_storage()`` (they
hold the memory, not the tensor): copy (``.clone()``) what must outlive the batch tensor.

Memory: a slot's pages are allocated when first written, so the ring holds about what the
DataLoader's own peak was (the batches in flight and held), but for the loader's whole life
(a train ring stays resident while the eval loader runs) instead of batch by batch.
"""
from __future__ import annotations

import collections
import weakref
from typing import NamedTuple

import torch


class SlotTask(NamedTuple):
    """One batch's keys and the ring slot to write it into (None: a fresh segment)."""
    slot: int | None
    keys: list


class RingBatches:
    """The DataLoader's batch sampler: ``batches``' key lists, each with a free slot."""

    def __init__(self, batches, ring: "RingLoader"):
        self.batches, self.ring = batches, ring

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for keys in self.batches:
            yield SlotTask(self.ring.take(), list(keys))


class RingLoader:
    """Iterates a DataLoader whose dataset writes into ``memory`` (float32 [slots, *shape]),
    handing out (tensor on the slot, labels); anything else the DataLoader yields passes.

    ``make_loader(batch_sampler)`` builds the DataLoader; ``sampler`` stays reachable here."""

    def __init__(self, make_loader, batches, memory: torch.Tensor, sampler=None):
        self.memory, self.sampler = memory, sampler
        self._free = collections.deque(range(memory.shape[0]))   # append/popleft: thread-safe
        self._pending: dict[int, int] = {}   # slot -> epoch it was dispatched in
        self._epoch = 0
        self.fallbacks = 0                   # batches that found no free slot
        self.loader = make_loader(RingBatches(batches, self))

    def __len__(self) -> int:
        return len(self.loader)

    def take(self) -> int | None:
        """A free slot for a batch being dispatched now, or None."""
        try:
            slot = self._free.popleft()
        except IndexError:
            self.fallbacks += 1
            return None
        self._pending[slot] = self._epoch
        return slot

    def __iter__(self):
        self._epoch += 1
        it = iter(self.loader)   # persistent workers: returns once the old tasks are done
        for slot, epoch in list(self._pending.items()):
            if epoch < self._epoch:          # dispatched by an abandoned epoch, never read
                del self._pending[slot]
                self._free.append(slot)
        for x, y in it:   # no reference kept here to a batch handed out
            yield (self._hand_out(x, len(y)) if isinstance(x, int) else x), y

    def _hand_out(self, slot: int, n: int) -> torch.Tensor:
        del self._pending[slot]
        shape = (n, *self.memory.shape[2:])
        x = torch.empty(0, dtype=self.memory.dtype).set_(
            self.memory.untyped_storage(), slot * self.memory.stride(0), shape,
            self.memory.stride()[1:])
        weakref.finalize(x, self._free.append, slot)   # not a view of memory: its own base
        return x


def ring_memory(slots: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 [slots, *shape] in shared memory; pages are allocated on first write only."""
    return torch.empty((slots, *shape)).share_memory_()
