"""The self-supervised kNN monitor over a bank sharded by rank, and the engine's embed() that
drives it: equal fn calls on every rank, rows ordered by the loaders' real dataset indices."""
import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed as dist_utils
from trainer.engine import Trainer
from trainer.methods.ssl_base import knn_scores

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
    """What embed() uses of a Trainer: a model, the eval loader of one split, the ranks."""
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

    loader, model = Loader(), nn.Identity()
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
