"""The extraction service (trainer/extraction.py): memory bounds that do not grow with the
split, sharded passes equal to unsharded ones, resumable passes, and one kNN vote for the
monitor and the bank tools."""
import inspect
import json
import os
import socket
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import ROOT
from tests.test_knn_monitor import SKIPPED, _fake_trainer
from ltrainer.trainer import distributed as dist_utils
from ltrainer.trainer import extraction, knn, pseudo_labels
from ltrainer.trainer.engine import Trainer

N, DIM, CLASSES = 23, 8, 5

def test_monitor_bank_adds_its_own_size_not_the_freed_batches():
    """glibc kept the freed batch buffers of the pass (172-287 MB added for a 59 MB bank here,
    1.2-1.8 GB per rank on the iNat bench); with the heap bounded (extraction.bounded_heap, in
    every embed) the pass adds the bank and little more."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # bench_scale's kNN rank (the real embed / prepare_eval, float16 blocks), one process,
    # a 60,000 x 512 bank: the RSS the pass leaves held next to the bank's size
    proc = subprocess.run([sys.executable, "tools/bench_scale.py", "--knn-rank", "0", "--world",
                           "1", "--port", str(port), "--bank", "60000", "--dim", "512"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 58 < got["bank_mb"] < 60
    assert got["kept_mb"] < 1.25 * got["bank_mb"] + 16, got


def _features(ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    table = F.normalize(torch.randn(N, DIM, generator=g), dim=1)
    return table[ids.long()]


def _shard_worker(out):
    """Each rank: its gappy, uneven share of N items through the real Trainer.embed into one
    folder of row files (pseudo-label rows) and into the float16 feature cache."""
    info = dist_utils.setup("cpu")
    torch.set_num_threads(1)
    fake = _fake_trainer(info.rank, info.world_size, torch.arange(N))
    fake.embed = lambda *a, **k: Trainer.embed(fake, *a, **k)
    extraction.embed_to_files(fake.embed, "pool", _features, f"{out}/rows", info.rank,
                              chunk_rows=2)
    cache = extraction.cache_split(fake.embed, "train", _features, f"{out}/cache", info.rank,
                                   N, CLASSES)
    torch.save({"rows": torch.from_numpy(cache.rows),
                "first": cache.load(0), "labels": torch.from_numpy(cache.labels)},
               f"{out}/cache{info.rank}.pt")


def test_sharded_row_files_and_feature_cache_equal_the_unsharded_pass(tmp_path):
    """2 gloo processes write their own rows (never gathered); assembled by dataset index they
    are the one-process result, skipped items absent; the cRT cache is a float16 file that
    every rank maps, holding the same rows."""
    dist_utils.run_local(_shard_worker, 2, {"out": str(tmp_path)})
    kept = [i for i in range(N) if i not in SKIPPED]
    feats, labels, present = extraction.assemble_rows(str(tmp_path / "rows"), N)
    assert present.tolist() == [i not in SKIPPED for i in range(N)]
    np.testing.assert_array_equal(feats[kept], _features(torch.tensor(kept)).numpy())
    np.testing.assert_array_equal(labels[kept], np.array(kept) % CLASSES)
    assert len(extraction.chunk_files(str(tmp_path / "rows"))) > 2     # chunks of 2 rows
    cached = np.load(tmp_path / "cache" / "features.npy", mmap_mode="r")
    assert cached.dtype == np.float16 and cached.shape == (N, DIM)
    np.testing.assert_allclose(cached[kept].astype(np.float32),
                               _features(torch.tensor(kept)).numpy(), atol=1e-3)
    for r in range(2):
        got = torch.load(tmp_path / f"cache{r}.pt", weights_only=True)
        assert got["rows"].tolist() == kept                 # both ranks see the whole split
        assert got["labels"].tolist() == [i % CLASSES for i in kept]
        assert got["first"].dtype == torch.float32
    assert not (tmp_path / "cache" / "rows").exists()


def test_pseudo_label_assembly_holds_a_chunk_not_the_pool_probabilities(tmp_path):
    """Rank 0 used to hold the gathered N x (C + 2) predictions and an N x C float32 array
    besides; from the row files it keeps N x 2 numbers and one chunk, the probabilities going
    from a memory-mapped file into the .npz."""
    n, c = 20000, 250
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=g)
    predict = pseudo_labels.predictor(lambda x: x, c, save_probs=True)
    folder = str(tmp_path / "rows")
    for rank in range(2):                      # two ranks' shards: items r, r + 2, ...
        writer = extraction.ShardWriter(folder, rank, chunk_rows=1000)
        for a in range(rank, n, 2000):
            ids = torch.arange(a, min(n, a + 2000), 2)
            writer(predict(logits[ids]), torch.zeros(len(ids)), ids)
        writer.flush()
    del writer
    probs_mb = n * c * 4 / 2 ** 20
    tracemalloc.start()
    pl = pseudo_labels.from_row_files(folder, n, c, np.arange(n) % c, save_probs=True,
                                      pool_fingerprint="fp")
    assembly = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.reset_peak()
    pseudo_labels.save(str(tmp_path / "pl.npz"), pl)
    saving = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    assert assembly < probs_mb / 4, (assembly, probs_mb)
    assert saving < 34, saving    # numpy streams a memmap into the .npz in 16 MB buffers
    back = pseudo_labels.load(str(tmp_path / "pl.npz"))
    p = torch.softmax(logits, 1)
    np.testing.assert_array_equal(back.labels, p.argmax(1).numpy())
    np.testing.assert_allclose(back.probs, p.numpy(), rtol=1e-6)
    assert back.selected.all() and back.meta["unread"] == 0


def test_a_killed_chunked_pass_redoes_only_its_missing_chunks(tmp_path):
    """run_chunks after a crash in its third chunk: the two written chunks are kept, the rest
    are made, and the assembled rows equal an uninterrupted pass's."""
    data = [(torch.full((3,), float(i)), i % 4) for i in range(10)]
    seen = []

    def forward(x):
        seen.append(x[:, 0].long().tolist())
        if len(seen) == 3 and crash[0]:
            raise KeyboardInterrupt("killed")
        return x * 2
    crash = [True]
    part, ident = str(tmp_path / "part"), {"what": "test", "count": 10}
    with pytest.raises(KeyboardInterrupt):
        extraction.run_chunks(part, data, forward, ident, chunk_size=3, batch_size=3,
                              progress=False)
    assert len(extraction.chunk_files(part)) == 2
    crash[0], seen[:] = False, []
    assert extraction.run_chunks(part, data, forward, ident, chunk_size=3, batch_size=3,
                                 progress=False) == 4
    assert seen == [[6, 7, 8], [9]]
    feats, labels, present = extraction.assemble_rows(part, 10)
    assert present.all() and labels.tolist() == [i % 4 for i in range(10)]
    np.testing.assert_array_equal(feats[:, 0], 2 * np.arange(10))
    with pytest.raises(extraction.ExtractionError, match="Differences: what"):
        extraction.run_chunks(part, data, forward, {"what": "other", "count": 10},
                              chunk_size=3, progress=False)


def test_one_knn_vote_and_temperature_for_monitor_and_tools():
    """The monitor (knn.scores over a bank) and the bank tools (a faiss-style search result
    through banks.search.knn_vote) predict the same classes, with one default temperature."""
    from ltrainer.tools import feature_bank as tool
    from ltrainer.trainer.banks.search import knn_evaluate, knn_vote
    from ltrainer.trainer.methods.ssl_base import SelfSupervised
    g = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (200,), generator=g)
    queries = F.normalize(torch.randn(50, 16, generator=g), dim=1)
    k = 9
    monitor = knn.scores(queries, bank, labels, 7, k).argmax(1).numpy()
    sims, ids = (queries @ bank.T).topk(k, dim=1)        # what an exact faiss search returns
    np.testing.assert_array_equal(knn_vote(sims.numpy(), ids.numpy(), labels.numpy(), 7),
                                  monitor)
    ids_missing = ids.numpy().copy()
    ids_missing[:, -1] = -1                              # an IVF search that found k - 1
    np.testing.assert_array_equal(
        knn_vote(sims.numpy(), ids_missing, labels.numpy(), 7),
        knn.scores(queries, bank, labels, 7, k - 1).argmax(1).numpy())
    default = SelfSupervised.config["knn"]["t"].default
    assert default == knn.DEFAULT_T == 0.1
    assert inspect.signature(knn_evaluate).parameters["temperature"].default == default
    assert inspect.signature(knn_vote).parameters["temperature"].default == default
    assert tool.parse_args(["knn", "--run", "RUN"]).temperature == default
