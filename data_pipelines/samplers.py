"""Training samplers that are pure functions of (seed, epoch), for exact resume and DDP.

Each epoch one GLOBAL order is built from a torch.Generator seeded by (seed, epoch) and cut
into global batches of B = local batch b x world; rank r takes the r-th contiguous slice of b
items of each global batch. So the ranks' i-th local batches, concatenated in rank order, are
exactly the i-th global batch of a single-process run: a run on W GPUs sees the same batches
as a run on one, and per-rank statistics (BatchNorm, MoCo's shuffled keys) equal those of
contiguous groups of the single-process batch. The tail that does not fill a whole global
batch is dropped so every rank runs the same number of steps.

Training samplers yield ``(index, sample_seed)``: sample_seed depends only on
(seed, epoch, position in the global order), and AugmentedDataset seeds the augmentation
with it, so an image gets the same crop whatever the worker count, world size or resume point.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

SAMPLER_KINDS = ("uniform", "class_aware", "sqrt", "cb")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (wrapping arithmetic): a cheap, well-mixed hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mix_seeds(*values: int) -> int:
    """Hash integers (any sign) into one 64-bit value."""
    h = np.array([0x243F6A8885A308D3], dtype=np.uint64)
    for v in values:
        h = _splitmix64(h ^ np.array([int(v) & _MASK64], dtype=np.uint64))
    return int(h[0])


def epoch_seed(seed: int, epoch: int) -> int:
    """63-bit seed of the generator that builds epoch ``epoch``'s global order."""
    return mix_seeds(seed, epoch, 0x0DE) >> 1


def sample_seeds(seed: int, epoch: int, positions) -> np.ndarray:
    """63-bit per-sample seeds for global positions of one epoch (int64 array)."""
    base = np.uint64(mix_seeds(seed, epoch, 0x5EED))
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    return (_splitmix64(pos ^ base) >> np.uint64(1)).astype(np.int64)


class _TrainSampler(Sampler):
    """Shared sharding, tail dropping, mid-epoch skip and state for the training samplers."""

    def __init__(self, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"sampler: expected batch_size (local) >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"sampler: expected 0 <= rank < world_size, got rank={rank} "
                             f"world_size={world_size}")
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = 0
        self.start_batch = 0

    # subclasses: total length of the global order, and the order itself
    def _global_len(self) -> int:
        raise NotImplementedError

    def _global_order(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_batches(self) -> int:
        """Full local batches per epoch (the same on every rank)."""
        return self._global_len() // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip its first ``start_batch`` local batches (mid-epoch resume)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"sampler: start_batch must lie in [0, {self.num_batches}], "
                             f"got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state.get("start_batch", 0)))

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size

    def global_order(self, epoch: Optional[int] = None) -> torch.Tensor:
        """The full (untruncated) global order of an epoch, as an int64 tensor."""
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, self.epoch if epoch is None else epoch))
        order = self._global_order(g)
        assert len(order) == self._global_len()
        return order

    def local_positions(self) -> np.ndarray:
        """Global positions this rank yields this epoch, after the skip."""
        b, w = self.batch_size, self.world_size
        starts = np.arange(self.start_batch, self.num_batches, dtype=np.int64) * b * w + self.rank * b
        return (starts[:, None] + np.arange(b, dtype=np.int64)[None, :]).ravel()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.global_order().numpy()
        pos = self.local_positions()
        seeds = sample_seeds(self.seed, self.epoch, pos)
        return iter(zip(order[pos].tolist(), seeds.tolist()))


class UniformSampler(_TrainSampler):
    """A random permutation of 0..n-1 each epoch."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0):
        super().__init__(batch_size, world_size, rank, seed)
        if n < 0:
            raise ValueError(f"UniformSampler: expected n >= 0, got {n}")
        self.n = int(n)

    def _global_len(self) -> int:
        return self.n

    def _global_order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator)


class ClassWeightedSampler(_TrainSampler):
    """Draw a class from ``class_probs``, then the next item of that class's shuffled list.

    Class frequencies follow class_probs (i.i.d. draws) while the items of a class are used
    evenly: each class list is reshuffled and restarted when exhausted. All lists restart at
    every epoch, keeping the sampler a pure function of (seed, epoch).
    """

    def __init__(self, labels, class_probs: Sequence[float], num_samples: int, batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(batch_size, world_size, rank, seed)
        labels = np.asarray(labels, dtype=np.int64)
        probs = np.asarray(class_probs, dtype=np.float64)
        if probs.ndim != 1 or probs.size == 0:
            raise ValueError("ClassWeightedSampler: expected a non-empty 1-D class_probs")
        if labels.size and (labels.min() < 0 or labels.max() >= probs.size):
            raise ValueError(f"ClassWeightedSampler: labels must lie in [0, {probs.size}) to "
                             f"match class_probs, got range [{labels.min()}, {labels.max()}]")
        if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.sum() <= 0:
            raise ValueError(f"ClassWeightedSampler: class_probs must be finite, >= 0 and not "
                             f"all zero, got {probs.tolist()}")
        counts = np.bincount(labels, minlength=probs.size)
        empty = np.where((probs > 0) & (counts == 0))[0]
        if empty.size:
            raise ValueError(f"ClassWeightedSampler: classes {empty.tolist()[:10]} have "
                             f"positive probability but no items")
        if num_samples < 0:
            raise ValueError(f"ClassWeightedSampler: expected num_samples >= 0, "
                             f"got {num_samples}")
        self.labels = labels
        self.class_probs = probs / probs.sum()
        self.num_samples = int(num_samples)
        order = np.argsort(labels, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        self._members = [torch.from_numpy(order[bounds[c]:bounds[c + 1]].copy())
                         for c in range(probs.size)]

    def _global_len(self) -> int:
        return self.num_samples

    def _global_order(self, generator: torch.Generator) -> torch.Tensor:
        if self.num_samples == 0:
            return torch.zeros(0, dtype=torch.int64)
        probs = torch.from_numpy(self.class_probs)
        cls = torch.multinomial(probs, self.num_samples, replacement=True, generator=generator)
        draws = torch.bincount(cls, minlength=len(self._members))
        chunks = []
        for c in torch.nonzero(draws).flatten().tolist():
            k, members = int(draws[c]), self._members[c]
            rounds = math.ceil(k / len(members))
            chunks.append(torch.cat([members[torch.randperm(len(members), generator=generator)]
                                     for _ in range(rounds)])[:k])
        # The j-th draw of class c (in position order) gets the j-th item of c's list.
        slots = torch.argsort(cls, stable=True)
        out = torch.empty(self.num_samples, dtype=torch.int64)
        out[slots] = torch.cat(chunks)
        return out


class SequentialSampler(Sampler):
    """Evaluation order: no shuffle, no drop; rank r gets r, r+W, ... (plain ints).

    Ranks may differ in length by one; gather with sizes, not with a fixed shape.
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"SequentialSampler: expected 0 <= rank < world_size, got "
                             f"rank={rank} world_size={world_size}")
        self.n, self.world_size, self.rank = int(n), int(world_size), int(rank)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Accepted for a uniform interface; the order never changes."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def build_sampler(kind: str, labels, *, batch_size: int, world_size: int = 1, rank: int = 0,
                  seed: int = 0, num_samples: Optional[int] = None,
                  class_weights: Optional[Sequence[float]] = None) -> _TrainSampler:
    """Training sampler by name; ``batch_size`` is the per-rank batch.

    - uniform: a permutation of all N items.
    - class_aware: every non-empty class equally likely; default epoch = max_count x C
      (classifier-balancing's cRT).
    - sqrt: class probability proportional to sqrt(n_c); default epoch = N.
    - cb: per-sample weight class_weights[y], i.e. class probability proportional to
      n_c x w_c (class-balanced re-sampling); default epoch = N.
    """
    labels = np.asarray(labels, dtype=np.int64)
    common = dict(batch_size=batch_size, world_size=world_size, rank=rank, seed=seed)
    if kind == "uniform":
        if num_samples is not None and num_samples != len(labels):
            raise ValueError(f"build_sampler: 'uniform' visits every item once per epoch; "
                             f"num_samples={num_samples} is not supported")
        return UniformSampler(len(labels), **common)
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"build_sampler: unknown kind {kind!r}; expected one of "
                         f"{SAMPLER_KINDS}")
    if labels.size == 0:
        raise ValueError(f"build_sampler: '{kind}' needs at least one labeled item")
    num_classes = int(labels.max()) + 1
    if kind == "cb" and class_weights is not None:
        num_classes = max(num_classes, len(class_weights))
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if kind == "class_aware":
        probs = (counts > 0).astype(np.float64)
        default_n = int(counts.max()) * int((counts > 0).sum())
    elif kind == "sqrt":
        probs = np.sqrt(counts)
        default_n = len(labels)
    else:
        if class_weights is None:
            raise ValueError("build_sampler: 'cb' needs class_weights (one weight per class)")
        w = np.asarray(class_weights, dtype=np.float64)
        if w.ndim != 1 or len(w) != num_classes:
            raise ValueError(f"build_sampler: expected {num_classes} class_weights, got "
                             f"shape {w.shape}")
        probs = counts * w
        default_n = len(labels)
    n = default_n if num_samples is None else int(num_samples)
    return ClassWeightedSampler(labels, probs, n, **common)
