"""Tests for data_pipelines.samplers: determinism, DDP sharding, class frequencies, resume."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltrainer.data_pipelines.samplers import (ClassWeightedSampler, SequentialSampler, UniformSampler,
                                     build_sampler)


def _items(sampler):
    return list(sampler)


def _indices(sampler):
    return [i for i, _ in sampler]


def _local_batches(sampler):
    items = list(sampler)
    b = sampler.batch_size
    return [items[k:k + b] for k in range(0, len(items), b)]


def test_uniform_epoch_visits_each_index_once():
    s = UniformSampler(100, batch_size=10, seed=3)
    idx = _indices(s)
    assert sorted(idx) == list(range(100)) and len(s) == 100 and s.num_batches == 10
    s = UniformSampler(103, batch_size=10, seed=3)  # tail of 3 dropped
    idx = _indices(s)
    assert len(idx) == len(set(idx)) == len(s) == 100
    seeds = [sd for _, sd in s]
    assert len(set(seeds)) == 100 and all(0 <= sd < 2 ** 63 for sd in seeds)


@pytest.mark.parametrize("kind", ["uniform", "class_aware"])
def test_ddp_shards_disjoint_and_union_is_single_process_set(kind):
    labels = np.repeat(np.arange(5), [40, 20, 10, 5, 3])  # 78 items
    world, b = 4, 3
    single = build_sampler(kind, labels, batch_size=b * world, seed=7)
    single.set_epoch(2)
    single_items = _items(single)
    shards = []
    for r in range(world):
        s = build_sampler(kind, labels, batch_size=b, world_size=world, rank=r, seed=7)
        s.set_epoch(2)
        assert s.num_batches == single.num_batches
        shards.append(_items(s))
    assert len({len(x) for x in shards}) == 1
    # positions (identified by their per-position seeds) never overlap across ranks
    seed_sets = [{sd for _, sd in x} for x in shards]
    for r in range(world):
        for q in range(r + 1, world):
            assert not seed_sets[r] & seed_sets[q]
    union = sorted(item for x in shards for item in x)
    assert union == sorted(single_items)
    if kind == "uniform":
        idx = [i for x in shards for i, _ in x]
        assert len(idx) == len(set(idx)) == single.num_batches * b * world


def test_union_of_ith_local_batches_is_ith_global_batch():
    labels = np.arange(200) % 7
    world, b = 4, 5
    single = build_sampler("sqrt", labels, batch_size=b * world, seed=1)
    global_batches = _local_batches(single)
    per_rank = []
    for r in range(world):
        s = build_sampler("sqrt", labels, batch_size=b, world_size=world, rank=r, seed=1)
        per_rank.append(_local_batches(s))
    assert all(len(x) == len(global_batches) for x in per_rank)
    for i, gb in enumerate(global_batches):
        assert sorted(item for r in range(world) for item in per_rank[r][i]) == sorted(gb)


def _freqs(sampler, num_classes, labels, epochs=1):
    counts = np.zeros(num_classes)
    for e in range(epochs):
        sampler.set_epoch(e)
        np.add.at(counts, labels[np.array(_indices(sampler))], 1)
    return counts


def _chi2_ok(observed, probs):
    """Pearson chi-square below a generous bound (mean df + 6 standard deviations)."""
    n = observed.sum()
    expected = n * np.asarray(probs)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(probs) - 1
    return chi2 < df + 6 * np.sqrt(2 * df), chi2


def test_class_aware_frequencies_uniform_on_100_to_1():
    counts = np.array([1000, 500, 200, 100, 50, 20, 10])
    labels = np.repeat(np.arange(7), counts)
    s = build_sampler("class_aware", labels, batch_size=50, seed=0)
    assert s.num_samples == 1000 * 7
    obs = _freqs(s, 7, labels, epochs=2)
    ok, chi2 = _chi2_ok(obs, np.full(7, 1 / 7))
    assert ok, (obs, chi2)
    # items of a rare class are used evenly (cycled, not drawn with replacement)
    s.set_epoch(0)
    idx = np.array(_indices(s))
    rare = np.bincount(idx[labels[idx] == 6], minlength=len(labels))[labels == 6]
    assert rare.max() - rare.min() <= 1


def test_sqrt_and_cb_frequencies_match_expectation():
    counts = np.array([800, 200, 50, 8])
    labels = np.repeat(np.arange(4), counts)
    s = build_sampler("sqrt", labels, batch_size=16, seed=4)
    assert s.num_samples == len(labels)
    ok, chi2 = _chi2_ok(_freqs(s, 4, labels, epochs=3), np.sqrt(counts) / np.sqrt(counts).sum())
    assert ok, chi2
    beta = 0.9999
    w = (1 - beta) / (1 - beta ** counts)
    w = w / w.sum() * 4
    s = build_sampler("cb", labels, batch_size=16, seed=4, class_weights=w)
    p = counts * w / (counts * w).sum()
    ok, chi2 = _chi2_ok(_freqs(s, 4, labels, epochs=3), p)
    assert ok, chi2
    with pytest.raises(ValueError, match="class_weights"):
        build_sampler("cb", labels, batch_size=16)


def test_deterministic_per_seed_epoch_and_changes_across_epochs():
    labels = np.arange(300) % 3
    for kind in ("uniform", "class_aware", "sqrt"):
        a = build_sampler(kind, labels, batch_size=10, seed=9)
        b = build_sampler(kind, labels, batch_size=10, seed=9)
        a.set_epoch(5)
        b.set_epoch(5)
        assert _items(a) == _items(b)
        first = _items(a)
        a.set_epoch(6)
        assert _indices(a) != [i for i, _ in first]
        c = build_sampler(kind, labels, batch_size=10, seed=10)
        c.set_epoch(5)
        assert _indices(c) != [i for i, _ in first]


def test_start_batch_skip_equals_tail_and_state_dict():
    labels = np.arange(97) % 5
    for kind in ("uniform", "class_aware"):
        for world, rank in ((1, 0), (2, 1)):
            s = build_sampler(kind, labels, batch_size=4, world_size=world, rank=rank, seed=2)
            s.set_epoch(3)
            full = _items(s)
            s.set_epoch(3, start_batch=5)
            assert len(s) == len(full) - 20
            assert _items(s) == full[20:]
            state = s.state_dict()
            assert state == {"epoch": 3, "start_batch": 5}
            t = build_sampler(kind, labels, batch_size=4, world_size=world, rank=rank, seed=2)
            t.load_state_dict(state)
            assert _items(t) == full[20:]
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, start_batch=s.num_batches + 1)


def test_sequential_sampler_and_bad_args():
    assert list(SequentialSampler(10)) == list(range(10))
    shards = [list(SequentialSampler(10, world_size=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(SequentialSampler(10, 3, r)) for r in range(3)] == [4, 3, 3]
    with pytest.raises(ValueError, match="rank"):
        UniformSampler(10, batch_size=2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="unknown kind"):
        build_sampler("progresive", np.zeros(4, int), batch_size=2)  # "progressive" is a kind now
    with pytest.raises(ValueError, match="no items"):
        ClassWeightedSampler(np.zeros(4, int), [0.5, 0.5], 10, batch_size=2)


# ----------------------------------------------------------------------------- 2-process gloo

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, labels, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        s = build_sampler("class_aware", labels, batch_size=8, world_size=world, rank=rank,
                          seed=11)
        s.set_epoch(1)
        items = list(s)
        idx = torch.tensor([i for i, _ in items], dtype=torch.int64)
        seeds = torch.tensor([sd for _, sd in items], dtype=torch.int64)
        all_idx = [torch.zeros_like(idx) for _ in range(world)]
        all_seeds = [torch.zeros_like(seeds) for _ in range(world)]
        dist.all_gather(all_idx, idx)
        dist.all_gather(all_seeds, seeds)
        if rank == 0:
            np.savez(os.path.join(out_dir, "gathered.npz"),
                     idx=torch.stack(all_idx).numpy(), seeds=torch.stack(all_seeds).numpy())
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_class_aware(tmp_path):
    counts = np.array([400, 100, 40, 4])
    labels = np.repeat(np.arange(4), counts)
    mp.spawn(_gloo_worker, args=(2, _free_port(), labels, str(tmp_path)), nprocs=2, join=True)
    data = np.load(tmp_path / "gathered.npz")
    idx, seeds = data["idx"], data["seeds"]
    assert idx.shape[0] == 2 and idx.shape[1] > 0
    assert not set(seeds[0].tolist()) & set(seeds[1].tolist())  # no shared positions
    obs = np.bincount(labels[idx.ravel()], minlength=4).astype(float)
    ok, chi2 = _chi2_ok(obs, np.full(4, 0.25))
    assert ok, (obs, chi2)
    single = build_sampler("class_aware", labels, batch_size=16, seed=11)
    single.set_epoch(1)
    merged = sorted(zip(idx.ravel().tolist(), seeds.ravel().tolist()))
    assert merged == sorted(single)
