"""data_pipelines/batch_ring.py: reused batch memory gives the same batches as fresh memory,
and a slot is never rewritten while anything still reads the batch handed out from it."""
import numpy as np
import pytest
import torch
from PIL import Image

from ltrainer.data_pipelines.augment import DEFAULT_STATS, augment_spec, build_transform
from ltrainer.data_pipelines.batch_ring import RingLoader
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.samplers import build_sampler
from ltrainer.data_pipelines.sources import FileSource
from ltrainer.data_pipelines.torchvision_loader import build_torchvision_loader

MEAN, STD = DEFAULT_STATS["imagenet"]
CFG = {"augment": "imagenet", "stats": "imagenet", "source": "list", "image_size": 64}
N, BATCH = 44, 4     # 11 batches a epoch, the last one full; more batches than slots (8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ring")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(N):
        arr = rng.integers(0, 256, (90 + k % 7, 120, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{k}.JPEG", quality=90)
        paths.append(f"{k}.JPEG")
    src = FileSource(str(root), paths, [k % 5 for k in range(N)], 5, "ring")
    return AugmentedDataset(src, build_transform("imagenet", True, 64, MEAN, STD, 3))


def _loader(dataset, reuse, batch=BATCH):
    sampler = build_sampler("uniform", dataset.labels, batch_size=batch, seed=3)
    spec = augment_spec(CFG, True, 3)
    return sampler, build_torchvision_loader(dataset, sampler, batch, 2, seed=1, spec=spec,
                                             reuse_batches=reuse)


def test_same_batches_as_fresh_memory_over_epochs_and_a_break(dataset):
    (sa, ring), (sb, fresh) = _loader(dataset, True), _loader(dataset, False)
    assert isinstance(ring, RingLoader) and isinstance(fresh, torch.utils.data.DataLoader)
    assert len(ring) == len(fresh) == N // BATCH and ring.sampler is sa
    for epoch in range(3):
        sa.set_epoch(epoch)
        sb.set_epoch(epoch)
        n = 0
        for (xa, ya), (xb, yb) in zip(ring, fresh):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            n += 1
            if epoch == 1 and n == 3:
                break          # abandoned: its in-flight slots come back at the next epoch
        assert n == (3 if epoch == 1 else N // BATCH)
    assert len(ring._free) == ring.memory.shape[0] - 1    # xa: the last batch, still held
    del xa
    assert not ring._pending and len(ring._free) == ring.memory.shape[0]


def test_a_slot_waits_for_every_reader(dataset):
    """A view kept across the epoch, a batch kept by autograd until backward, and a consumer
    that keeps every batch (more than there are slots): all read what was handed out."""
    (sa, ring), (sb, fresh) = _loader(dataset, True), _loader(dataset, False)
    ref = [x.clone() for x, _ in fresh]
    conv = torch.nn.Conv2d(3, 2, 3)
    view, graph = None, None
    for b, (x, _) in enumerate(ring):
        if b == 0:
            view = x[1:, :, 5:]                     # a view outlives the loop variable
        if b == 1:
            graph = conv(x).square().sum()          # backward needs x itself
            before = torch.autograd.grad(graph, conv.weight, retain_graph=True)[0]
    assert torch.equal(view, ref[0][1:, :, 5:])
    after = torch.autograd.grad(graph, conv.weight)[0]
    assert torch.equal(before, after)
    kept = list(ring)                               # holds all 11 > 8 slots: fresh memory
    assert ring.fallbacks > 0
    assert all(torch.equal(x, r) for (x, _), r in zip(kept, ref))
    del kept, view, graph, x
    assert len(ring._free) == ring.memory.shape[0]  # every slot came back


def test_partial_last_batch_and_when_it_is_used(dataset):
    spec = augment_spec(CFG, True, 3)
    sampler = range(N)                     # plain indices, 44 = 8 x 5 + 4
    ring = build_torchvision_loader(dataset, sampler, 5, 2, seed=1, spec=spec)
    assert isinstance(ring, RingLoader)
    batches = [(x.clone(), y) for x, y in ring]
    assert [len(y) for _, y in batches] == [5] * 8 + [4]
    assert all(x.shape == (len(y), 3, 64, 64) for x, y in batches)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.as_tensor(dataset.labels))
    for kwargs in (dict(workers=0), dict(workers=2, pin_memory=True), dict(workers=2, spec=None)):
        args = dict(workers=2, spec=spec) | kwargs
        loader = build_torchvision_loader(dataset, sampler, 5, args.pop("workers"), seed=1,
                                          **args)
        assert isinstance(loader, torch.utils.data.DataLoader), kwargs


def test_engine_trains_the_same_weights_with_reused_worker_memory(tmp_path, monkeypatch):
    """Two epochs from photo-like JPEG files with the imagenet recipe: the run whose worker
    batches go through the ring (data.workers=1, slots reused within each epoch) ends with
    the weights of the run decoding in the training process (data.workers=0): no batch was
    rewritten while a step still read it."""
    from ltrainer.tools.bench_loaders import make_photo_set
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.engine import train

    listed = make_photo_set(str(tmp_path / "set"), n=48, classes=3)
    handed = []
    real = RingLoader._hand_out
    monkeypatch.setattr(RingLoader, "_hand_out", lambda self, *a: handed.append(a) or
                        real(self, *a))
    weights = {}
    for workers in (0, 1):
        cfg = load_config(None, [
            "data.source=list", f"data.root={tmp_path / 'set'}", f"data.train_list={listed}",
            f"data.test_list={listed}", "data.num_classes=3", "data.stats=imagenet",
            "data.augment=imagenet", "data.image_size=32", "data.n_max=16", "data.rho=1",
            "data.batch_size=4", "data.eval_batch_size=16", f"data.workers={workers}",
            "model.name=resnet8", "sched.epochs=2", "sched.warmup_epochs=0",
            "eval.every_epochs=1", "engine.progress=none", "run.deterministic=true",
            f"run.out_dir={tmp_path}", f"run.name=w{workers}"])
        res = train(cfg)
        assert res["global_step"] == 2 * 48 // 4
        assert (len(handed) >= 2 * 12) == (workers == 1)   # the train batches came by the ring
        weights[workers] = torch.load(tmp_path / f"w{workers}" / "model_final.pt",
                                      weights_only=True)
    a, b = weights[0], weights[1]
    a, b = a.get("model", a), b.get("model", b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
