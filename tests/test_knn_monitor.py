"""The self-supervised kNN monitor over a bank sharded by rank, and the engine's embed() that
drives it: equal fn calls on every rank, rows ordered by the loaders' real dataset indices."""
import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ltrainer.trainer import distributed as dist_utils
from ltrainer.trainer.engine import Trainer
from ltrainer.trainer.knn import scores as knn_scores

N_BANK, N_QUERY, DIM, CLASSES, T = 37, 23, 8, 5, 0.1
SKIPPED = (4, 9, 17)            # eval items a loader dropped (data.on_bad_image: skip)
LOCAL_BATCH = (3, 12)           # rank 0 makes 4 batches, rank 1 one: embed must even them


def _data():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(N_BANK, DIM, generator=g), dim=1)
    labels = torch.randint(0, CLASSES, (N_BANK,), generator=g)
    queries = F.normalize(torch.randn(N_QUERY, DIM, generator=g), dim=1)
    return bank, labels, queries


def _fake_trainer(rank, world, queries):
    """Rank `rank`'s host for embed(): its share of the queries, SKIPPED left out, in batches
    of LOCAL_BATCH[rank], each telling its dataset indices."""
    mine = [i for i in range(rank, N_QUERY, world) if i not in SKIPPED]
    bs = LOCAL_BATCH[rank]
    batches = [mine[a:a + bs] for a in range(0, len(mine), bs)]

    class Loader:
        batch_indices = None

        def __len__(self):
            return len(batches)

        def __iter__(self):
            for ids in batches:
                self.batch_indices = torch.tensor(ids)
                yield queries[ids], torch.tensor(ids) % CLASSES

    return _embed_host(Loader(), nn.Identity(), rank, world)


def _embed_host(loader, model, rank=0, world=1):
    """What embed() uses of a Trainer: a model, the eval loader of one split, the ranks."""
    return SimpleNamespace(model=model, train_model=model, _to_device=lambda b: b,
                           data=SimpleNamespace(eval_loader=lambda split: loader),
                           autocast=contextlib.nullcontext, device=torch.device("cpu"),
                           info=SimpleNamespace(world_size=world, rank=rank))


def _worker(out, ks):
    info = dist_utils.setup("cpu")
    torch.set_num_threads(1)
    bank, labels, queries = _data()
    shard, shard_labels = bank[info.rank::info.world_size], labels[info.rank::info.world_size]
    fake = _fake_trainer(info.rank, info.world_size, queries)
    for k in ks:
        scores, y = Trainer.embed(fake, "val", lambda x: knn_scores(x, shard, shard_labels,
                                                                     CLASSES, k, T, block=4))
        torch.save({"scores": scores, "labels": y}, f"{out}/rank{info.rank}-k{k}.pt")


def test_sharded_knn_through_embed_equals_the_whole_bank(tmp_path):
    """2 gloo processes, each holding half the bank and an uneven, gappy half of the queries,
    give every rank the scores one process computes against the whole bank, in dataset order.
    k = 20 exceeds each shard's 18-19 rows (candidates padded)."""
    bank, labels, queries = _data()
    kept = [i for i in range(N_QUERY) if i not in SKIPPED]
    dist_utils.run_local(_worker, 2, {"out": str(tmp_path), "ks": (6, 20)})
    for k in (6, 20):
        ref = knn_scores(queries[kept], bank, labels, CLASSES, k, T)
        for r in range(2):
            got = torch.load(tmp_path / f"rank{r}-k{k}.pt", weights_only=True)
            assert torch.equal(got["labels"], torch.tensor(kept) % CLASSES)
            torch.testing.assert_close(got["scores"], ref, rtol=1e-5, atol=1e-6)
            assert torch.equal(got["scores"].argmax(1), ref.argmax(1))


def test_bank_blocks_do_not_change_the_scores():
    bank, labels, queries = _data()
    whole = knn_scores(queries, bank, labels, CLASSES, 6, T)
    for block in (1, 5, 36):
        torch.testing.assert_close(knn_scores(queries, bank, labels, CLASSES, 6, T, block=block),
                                   whole, rtol=1e-5, atol=1e-6)


def test_monitor_bank_is_stored_in_blocks_of_its_dtype_and_scores_as_before():
    """prepare_eval kept a list of batches and then their concatenation (two copies of the
    shard at the peak) in float32; now the shard is stored block by block in knn.bank_dtype,
    the old bank is dropped before the new one is built, and the scores stay: equal to rounding with
    float32 blocks, within float16's rounding with float16 ones."""
    from ltrainer.trainer.methods.ssl_base import SelfSupervised
    bank, labels, queries = _data()

    class Loader:
        def __len__(self):
            return -(-N_BANK // 4)

        def __iter__(self):
            for a in range(0, N_BANK, 4):
                yield bank[a:a + 4], labels[a:a + 4]

    class Identity(nn.Module):
        def features(self, x):
            return x

    model = Identity()
    fake = _embed_host(Loader(), model)
    fake.embed = lambda *a, **k: Trainer.embed(fake, *a, **k)
    ref = knn_scores(queries, bank, labels, CLASSES, 6, T)
    # float32 blocks: the same sums in another order; float16: features rounded to ~5e-4,
    # which exp(sim / 0.1) turns into ~1 % on a weight
    for dtype, tol in (("float32", 1e-5), ("float16", 2e-2)):
        method = SelfSupervised.__new__(SelfSupervised)
        if isinstance(method, nn.Module):   # methods are modules (issue 17)
            nn.Module.__init__(method)
        method.model, method.data = model, SimpleNamespace(num_classes=CLASSES)
        method.cfg = SimpleNamespace(knn=SimpleNamespace(k=6, t=T, bank_dtype=dtype))
        method.bank_block = 10
        method.bank = ["the previous evaluation's bank"]
        seen = []
        fake.embed = lambda *a, **k: (seen.append(method.bank), Trainer.embed(fake, *a, **k))[1]
        method.prepare_eval(fake)
        assert seen == [None]                  # the old bank was freed before embedding
        assert [len(b) for b in method.bank] == [10, 10, 10, 7]   # batches of 4, blocks of 10
        assert all(b.dtype == getattr(torch, dtype) for b in method.bank)
        assert torch.equal(method.bank_labels, labels) and method.bank_size == N_BANK
        got = method.predict(model, queries)
        torch.testing.assert_close(got, ref, rtol=tol, atol=1e-6)
        assert torch.equal(got.argmax(1), ref.argmax(1))


def test_paper_moco_configs_store_the_monitor_bank_in_float16():
    """The bench_scale figure is measured with the dtype the iNat config uses."""
    import yaml

    from tests.conftest import ROOT
    from ltrainer.tools import bench_scale
    for name in ("inat_moco_crt.yaml", "imagenet_lt_moco_crt.yaml"):
        with open(f"{ROOT}/configs/{name}") as f:
            stages = yaml.safe_load(f)["stages"]
        moco = next(s for s in stages if s.get("method", {}).get("name") == "moco")
        assert moco["knn"]["bank_dtype"] == bench_scale.KNN_BANK_DTYPE == "float16"
