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

from ltrainer.configspec import F, Part

SAMPLER_KINDS = ("uniform", "class_aware", "class_aware_cyclic", "sqrt", "cb", "progressive")
CLASS_AWARE_EPOCHS = ("max_count", "dataset")
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


def _mix_arrays(base: int, *arrays) -> np.ndarray:
    """mix_seeds(base, a[i], b[i], ...) in spirit, vectorised over int arrays (uint64)."""
    h = np.full(len(arrays[0]), base, dtype=np.uint64)
    for a in arrays:
        h = _splitmix64(h ^ np.asarray(a, dtype=np.int64).astype(np.uint64))
    return h


def _hash_keys(group_seeds: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of the given sizes: (group id of each slot, a pure 64-bit random key of each
    slot from its group's seed and its index in the group), vectorised."""
    gid = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    local = np.arange(int(sizes.sum()), dtype=np.int64) - starts[gid]
    return gid, _splitmix64(group_seeds.astype(np.uint64)[gid] ^ local.astype(np.uint64))


def _group_perms(group_seeds: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenated random permutations of 0..size-1, one per group, each a function of its
    group's seed only (so two epochs that touch the same group agree)."""
    if len(sizes) == 0:
        return np.zeros(0, np.int64)
    gid, key = _hash_keys(group_seeds, sizes)
    # By group, then by a 32-bit key: one permutation per group (one argsort, not a lexsort).
    order = np.argsort((gid.astype(np.uint64) << np.uint64(32)) | (key >> np.uint64(32)))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return order - starts[gid]


class ClassAwareCyclicSampler(_TrainSampler):
    """classifier-balancing's ClassAwareSampler as a pure function of (seed, epoch).

    The reference cycles through the classes in a shuffled order (reshuffled after each pass)
    and takes `samples_per_class` consecutive items from the visited class's own cycling
    list (reshuffled when exhausted); its iterators live across epochs. Here that endless
    stream is defined by position, every pass and every round of a class list drawn from a
    hash of (seed, pass) or (seed, class, round), and epoch e is the window
    [e L, (e + 1) L) of it (L = num_samples). With L = max_count x C and samples_per_class
    dividing max_count, each epoch is whole passes: every class exactly max_count times.
    """

    def __init__(self, labels, samples_per_class: int, num_samples: int, batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(batch_size, world_size, rank, seed)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0 or labels.min() < 0:
            raise ValueError("ClassAwareCyclicSampler: expected a non-empty array of labels >= 0")
        if samples_per_class < 1 or num_samples < 0:
            raise ValueError(f"ClassAwareCyclicSampler: expected samples_per_class >= 1 and "
                             f"num_samples >= 0, got {samples_per_class}, {num_samples}")
        counts = np.bincount(labels)
        self.classes = np.nonzero(counts)[0]                 # classes with items, visited
        self.sizes = counts[self.classes]
        self.k, self.num_samples = int(samples_per_class), int(num_samples)
        self.members = np.argsort(labels, kind="stable")     # class by class, index order
        self.first = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])   # per visited class

    def _global_len(self) -> int:
        return self.num_samples

    def _pass_perms(self, p0: int, p1: int) -> np.ndarray:
        """(p1 - p0, M): the class order (indices into self.classes) of passes p0..p1-1."""
        m = len(self.classes)
        seeds = _mix_arrays(mix_seeds(self.seed, 0xC1A55), np.arange(p0, p1))
        return _group_perms(seeds, np.full(p1 - p0, m, np.int64)).reshape(p1 - p0, m)

    def global_order(self, epoch: Optional[int] = None) -> torch.Tensor:
        """Epoch `epoch`'s window of the stream (no torch.Generator: hashes of the seed)."""
        return self._window(self.epoch if epoch is None else int(epoch))

    def _window(self, epoch: int) -> torch.Tensor:
        n, k, m = self.num_samples, self.k, len(self.classes)
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        q0 = epoch * n                                    # first stream position of the epoch
        v0, v1 = q0 // k, (q0 + n - 1) // k + 1           # the visits it touches
        p0, p1 = v0 // m, (v1 - 1) // m                   # first and last pass touched
        perms = self._pass_perms(p0, p1 + 1)
        q = np.arange(q0, q0 + n, dtype=np.int64)
        v = q // k
        cls = perms.ravel()[v - p0 * m]                   # visited-class index per position
        # Every pass visits every class once, so the draw of position q is its class's
        # j-th overall: k per earlier pass, plus its place in this visit.
        j = k * (v // m) + q % k
        # Class c is visited in passes pf..pl of this window; its draws there fall in rounds
        # r0..r1-1 of its list (round r = draws r n_c .. (r + 1) n_c - 1).
        slot0 = np.empty(m, np.int64)
        slot0[perms[0]] = np.arange(m)
        slot1 = np.empty(m, np.int64)
        slot1[perms[-1]] = np.arange(m)
        pf = p0 + (slot0 < v0 - p0 * m)
        pl = p1 - (slot1 >= v1 - p1 * m)
        r0 = (k * pf) // self.sizes
        rounds = np.where(pl >= pf, (k * pl + k - 1) // self.sizes + 1 - r0, 0)
        g_cls = np.repeat(np.arange(m), rounds)
        g_first = np.cumsum(rounds) - rounds               # first group of each class
        g_round = r0[g_cls] + np.arange(len(g_cls)) - g_first[g_cls]
        seeds = _mix_arrays(mix_seeds(self.seed, 0x17E5), self.classes[g_cls], g_round)
        sizes = self.sizes[g_cls]
        order = _group_perms(seeds, sizes)
        g_start = np.cumsum(sizes) - sizes
        n_c = self.sizes[cls]
        g = g_first[cls] + j // n_c - r0[cls]
        local = order[g_start[g] + j % n_c]
        return torch.from_numpy(self.members[self.first[cls] + local])


class ProgressivelyBalancedSampler(_TrainSampler):
    """Kang et al. 2020 ("Decoupling Representation and Classifier for Long-Tailed
    Recognition", ICLR, Sec. 3): class j is drawn with p_j(t) = (1 - t/T) n_j / N + (t/T) / C
    in epoch t of T, from instance-balanced at the start to class-balanced at the end (C: the
    classes with items). Items of a class are used evenly: its list is reshuffled and restarted
    when exhausted, every round drawn from a hash of (seed, epoch, class, round), so the epoch
    is a pure function of (seed, epoch), built without a loop over classes.
    """

    def __init__(self, labels, num_epochs: int, num_samples: Optional[int] = None,
                 batch_size: int = 1, world_size: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(batch_size, world_size, rank, seed)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0 or labels.min() < 0:
            raise ValueError("ProgressivelyBalancedSampler: expected a non-empty array of "
                             "labels >= 0")
        if num_epochs < 1:
            raise ValueError(f"ProgressivelyBalancedSampler: expected num_epochs (T) >= 1, got "
                             f"{num_epochs}")
        self.num_epochs = int(num_epochs)
        self.counts = np.bincount(labels)
        self.num_samples = len(labels) if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise ValueError(f"ProgressivelyBalancedSampler: expected num_samples >= 0, got "
                             f"{self.num_samples}")
        self.members = np.argsort(labels, kind="stable")          # class by class
        self.first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def _global_len(self) -> int:
        return self.num_samples

    def class_probs(self, epoch: int) -> np.ndarray:
        """p_j(t) of epoch t (t >= T: class-balanced)."""
        t = min(epoch / self.num_epochs, 1.0)
        present = (self.counts > 0).astype(np.float64)
        return (1 - t) * self.counts / self.counts.sum() + t * present / present.sum()

    def global_order(self, epoch: Optional[int] = None) -> torch.Tensor:
        # the class probabilities and item rounds are of the epoch asked for, not self.epoch
        self._for_epoch = self.epoch if epoch is None else int(epoch)
        return super().global_order(epoch)

    def _global_order(self, generator: torch.Generator) -> torch.Tensor:
        n, epoch = self.num_samples, self._for_epoch
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        probs = torch.from_numpy(self.class_probs(epoch))
        cls = torch.multinomial(probs, n, replacement=True, generator=generator).numpy()
        # j-th draw of class c (in position order): round j // n_c of c's list, place j % n_c
        per_cls = np.bincount(cls, minlength=len(self.counts))
        slots = np.argsort(cls, kind="stable")
        j = np.empty(n, np.int64)
        j[slots] = np.arange(n) - np.repeat(np.cumsum(per_cls) - per_cls, per_cls)
        sizes = np.maximum(self.counts, 1)
        rounds = -(-per_cls // sizes)                               # ceil, 0 for undrawn classes
        g_cls = np.repeat(np.arange(len(rounds)), rounds)
        g_round = np.arange(int(rounds.sum())) - np.repeat(np.cumsum(rounds) - rounds, rounds)
        base = np.uint64(mix_seeds(self.seed, epoch, 0x9B5))
        with np.errstate(over="ignore"):
            seeds = _splitmix64(base ^ (g_cls.astype(np.uint64) * np.uint64(0x100000001B3)
                                        + g_round.astype(np.uint64)))
        perms = _group_perms(seeds, sizes[g_cls])
        g_start = np.concatenate([[0], np.cumsum(sizes[g_cls])[:-1]]).astype(np.int64)
        g = (np.cumsum(rounds) - rounds)[cls] + j // sizes[cls]
        local = perms[g_start[g] + j % sizes[cls]]
        return torch.from_numpy(self.members[self.first[cls] + local])


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


def epoch_samples(kind: str, counts, class_aware_epoch: str = "max_count") -> int:
    """Default samples per epoch of a sampler kind over these class counts: N, or for the
    class-aware kinds max_count x C ('max_count': the reference sampler's length) or N
    ('dataset': the reference's training loop stops after N / batch steps)."""
    counts = np.asarray(counts)
    if kind in ("class_aware", "class_aware_cyclic") and class_aware_epoch == "max_count":
        return int(counts.max()) * int((counts > 0).sum())
    return int(counts.sum())


def build_sampler(kind: str, labels, *, batch_size: int, world_size: int = 1, rank: int = 0,
                  seed: int = 0, num_samples: Optional[int] = None,
                  class_weights: Optional[Sequence[float]] = None, samples_per_class: int = 1,
                  class_aware_epoch: str = "max_count",
                  num_epochs: Optional[int] = None) -> _TrainSampler:
    """Training sampler by name; ``batch_size`` is the per-rank batch.

    - uniform: a permutation of all N items.
    - class_aware: every non-empty class equally likely, drawn i.i.d.; default epoch
      max_count x C, or N with class_aware_epoch 'dataset' (see epoch_samples).
    - class_aware_cyclic: classifier-balancing's ClassAwareSampler (ClassAwareCyclicSampler):
      classes in shuffled passes, `samples_per_class` consecutive items per visit; same epoch.
    - sqrt: class probability proportional to sqrt(n_c); default epoch = N.
    - progressive: Kang et al.'s progressively-balanced sampling over `num_epochs` epochs
      (ProgressivelyBalancedSampler); default epoch = N.
    - cb: per-sample weight class_weights[y], i.e. class probability proportional to
      n_c x w_c (class-balanced re-sampling); default epoch = N.
    """
    labels = np.asarray(labels, dtype=np.int64)
    common = dict(batch_size=batch_size, world_size=world_size, rank=rank, seed=seed)
    if class_aware_epoch not in CLASS_AWARE_EPOCHS:
        raise ValueError(f"build_sampler: class_aware_epoch must be one of "
                         f"{CLASS_AWARE_EPOCHS}, got {class_aware_epoch!r}")
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
    default_n = epoch_samples(kind, counts, class_aware_epoch)
    n = default_n if num_samples is None else int(num_samples)
    if kind == "class_aware_cyclic":
        return ClassAwareCyclicSampler(labels, samples_per_class, n, **common)
    if kind == "progressive":
        if not num_epochs:
            raise ValueError("build_sampler: 'progressive' needs num_epochs (T, the epochs "
                             "over which it moves from instance- to class-balanced)")
        return ProgressivelyBalancedSampler(labels, num_epochs, n, **common)
    if kind == "class_aware":
        probs = (counts > 0).astype(np.float64)
    elif kind == "sqrt":
        probs = np.sqrt(counts)
    else:
        if class_weights is None:
            raise ValueError("build_sampler: 'cb' needs class_weights (one weight per class)")
        w = np.asarray(class_weights, dtype=np.float64)
        if w.ndim != 1 or len(w) != num_classes:
            raise ValueError(f"build_sampler: expected {num_classes} class_weights, got "
                             f"shape {w.shape}")
        probs = counts * w
    return ClassWeightedSampler(labels, probs, n, **common)


def sampler_options(data_cfg) -> dict:
    """The build_sampler keywords the `data` section sets (CONFIG below)."""
    return {"samples_per_class": data_cfg["samples_per_class"],
            "class_aware_epoch": data_cfg["class_aware_epoch"]}


# Keys of the class-aware samplers (read through build.py's sampled_loader).
CONFIG = Part({"data": {
    "samples_per_class": F("int", 1, ge=1,
                           help="class_aware_cyclic: consecutive images per class visit "
                                "(classifier-balancing's num_samples_cls; 4 in its cRT)"),
    "class_aware_epoch": F("str", "max_count", *CLASS_AWARE_EPOCHS,
                           help="samples per epoch of class-aware sampling: max_count x C, or "
                                "the training-set size as classifier-balancing's loop"),
}}, owner=__name__)
