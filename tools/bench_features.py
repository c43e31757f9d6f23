"""kNN search and t-SNE speed on large synthetic feature banks, in one run, as one table.

    python tools/bench_features.py            # kNN on 100k x 512 and 1M x 128, t-SNE of 10k / 50k
    python tools/bench_features.py --quick    # small sizes, a couple of minutes on 2 cores

kNN (cosine, k nearest of --queries queries): faiss exact (IndexFlatIP), faiss IVF (~4 sqrt(N)
lists, nprobe 16; recall@k against exact) and a torch brute force (blocked matmul + topk).
t-SNE: openTSNE on faiss neighbours against scikit-learn's TSNE (Barnes-Hut), with the same
perplexity and number of iterations; "2-D 10-NN acc" (leave-one-out label accuracy in the
embedding) checks both maps keep the classes apart. The data are clustered Gaussians (100
classes for kNN, 10 for t-SNE), so IVF lists are meaningful as with real features. Ratios are
against the first row of each group, timed in the same run: "run x" compares searches (or
embeddings), "total x" adds the index build.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


import numpy as np  # noqa: E402

from ltrainer.tools.tsne import embed  # noqa: E402
from ltrainer.trainer.banks import search as bank_search  # noqa: E402

FULL = {"knn": ["100000x512", "1000000x128"], "tsne": [10000, 50000], "queries": 1000}
QUICK = {"knn": ["20000x512", "200000x128"], "tsne": [2000], "queries": 500}  # ~2 min


def clustered(n: int, d: int, classes: int = 100, seed: int = 0, spread: float = 0.35,
              draw: int = 0):
    """Unit-norm points around `classes` random centres (float32), and their labels; the
    centres depend on `seed` only, the points also on `draw` (queries use another draw)."""
    centres = np.random.default_rng(seed).standard_normal((classes, d)).astype(np.float32)
    rng = np.random.default_rng([seed, draw])
    labels = rng.integers(0, classes, n)
    x = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 100000):
        b = min(n, a + 100000)
        x[a:b] = centres[labels[a:b]] + spread * rng.standard_normal((b - a, d), dtype=np.float32)
    return bank_search.normalized(x), labels


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def torch_knn(q: np.ndarray, r: np.ndarray, k: int, block: int = 131072):
    """Exact top-k inner products by blocks of the reference, merged as we go."""
    import torch

    qt = torch.from_numpy(q)
    best_s = torch.full((len(q), k), -float("inf"))
    best_i = torch.zeros((len(q), k), dtype=torch.int64)
    for a in range(0, len(r), block):
        s = qt @ torch.from_numpy(r[a:a + block]).T
        s, i = s.topk(min(k, s.shape[1]), dim=1)
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + a], 1)
        best_s, pos = cat_s.topk(k, dim=1)
        best_i = cat_i.gather(1, pos)
    return best_s.numpy(), best_i.numpy()


def bench_knn(n: int, d: int, queries: int, k: int, seed: int) -> list[dict]:
    r, _ = clustered(n, d, seed=seed)
    q, _ = clustered(queries, d, seed=seed, draw=1)
    task = f"kNN {n:,} x {d}, {queries} queries, k={k}"
    exact, build = timed(lambda: bank_search.build_index(r, "flat", device="cpu"))
    (_, ex_ids), search = timed(lambda: exact.search(q, k))
    rows = [{"task": task, "method": "faiss exact (flat)", "build s": build, "run s": search,
             "recall": 1.0}]
    ivf, build = timed(lambda: bank_search.build_index(r, "ivf", nprobe=16, device="cpu", seed=seed))
    (_, ivf_ids), search = timed(lambda: ivf.search(q, k))
    rows.append({"task": task, "method": f"faiss IVF (nlist {ivf.nlist}, nprobe {ivf.nprobe})",
                 "build s": build, "run s": search, "recall": bank_search.recall_at_k(ivf_ids, ex_ids)})
    (_, t_ids), search = timed(lambda: torch_knn(q, r, k))
    rows.append({"task": task, "method": "torch brute force", "build s": 0.0, "run s": search,
                 "recall": bank_search.recall_at_k(t_ids, ex_ids)})
    return rows


def knn2d_accuracy(y2: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Leave-one-out majority-vote accuracy of the k nearest points in the 2-D map."""
    index = bank_search.build_index(np.ascontiguousarray(y2, dtype=np.float32), "flat", metric="l2",
                           device="cpu")
    _, ids = bank_search.search_excluding_self(index, np.ascontiguousarray(y2, dtype=np.float32), k,
                                      np.arange(len(y2)))
    votes = np.apply_along_axis(np.bincount, 1, labels[ids], minlength=labels.max() + 1)
    return float(np.mean(votes.argmax(1) == labels))


def bench_tsne(n: int, iters: int, jobs: int, seed: int, sklearn_max: int) -> list[dict]:
    x, labels = clustered(n, 128, classes=10, seed=seed, spread=0.6)
    task = f"t-SNE {n:,} x 128, {iters} iterations"
    y, t = timed(lambda: embed(x, 30, iters, seed, jobs))
    rows = [{"task": task, "method": "openTSNE + faiss neighbours", "build s": 0.0, "run s": t,
             "2-D 10-NN acc": knn2d_accuracy(y, labels)}]
    if n > sklearn_max:
        rows.append({"task": task, "method": f"scikit-learn TSNE: skipped (n > {sklearn_max})"})
        return rows
    manifold = bank_search.require("sklearn.manifold", "scikit-learn")
    sk = manifold.TSNE(n_components=2, perplexity=30, max_iter=iters, init="pca",
                       learning_rate="auto", random_state=seed, n_jobs=jobs)
    y, t = timed(lambda: sk.fit_transform(x))
    rows.append({"task": task, "method": "scikit-learn TSNE (Barnes-Hut)", "build s": 0.0,
                 "run s": t, "2-D 10-NN acc": knn2d_accuracy(y, labels)})
    return rows


def with_ratios(rows: list[dict]) -> list[dict]:
    """Times relative to the task's first row: 'run x' for the search (or embedding) alone,
    'total x' with the index build (IVF k-means), which a bank pays once for many queries."""
    base = {}
    for r in rows:
        if "run s" not in r:
            continue
        r["total s"] = r["build s"] + r["run s"]
        b = base.setdefault(r["task"], r)
        r["run x"] = r["run s"] / b["run s"]
        r["total x"] = r["total s"] / b["total s"]
    return rows


def render(rows: list[dict]) -> str:
    cols = ["task", "method", "build s", "run s", "total s", "run x", "total x", "recall",
            "2-D 10-NN acc"]

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return ""
        if c.endswith(" x"):
            return f"{v:.2f}x"
        return f"{v:.3f}" if c in ("recall", "2-D 10-NN acc") else (
            f"{v:.2f}" if isinstance(v, float) else str(v))

    cells = [cols] + [[cell(r, c) for c in cols] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    out = []
    for i, r in enumerate(cells):
        out.append(" | ".join(c.ljust(x) if j < 2 else c.rjust(x)
                              for j, (c, x) in enumerate(zip(r, w))))
        if i == 0:
            out.append("-+-".join("-" * x for x in w))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK}")
    p.add_argument("--knn", nargs="*", help="banks NxD (default 100000x512 1000000x128)")
    p.add_argument("--tsne", nargs="*", type=int, help="t-SNE sizes (default 10000 50000)")
    p.add_argument("--queries", type=int)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--iters", type=int, default=750, help="t-SNE iterations, both libraries")
    p.add_argument("--jobs", type=int, help="threads for every library; default all cores, "
                   "1 with --quick (on shared 2-core machines 2 threads can be 4-9x slower)")
    p.add_argument("--sklearn-max", type=int, default=10**9,
                   help="skip scikit-learn above this many points")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    knn = args.knn if args.knn is not None else sizes["knn"]
    tsne = args.tsne if args.tsne is not None else sizes["tsne"]
    queries = args.queries or sizes["queries"]
    args.jobs = args.jobs or (1 if args.quick else os.cpu_count() or 1)
    import torch

    torch.set_num_threads(args.jobs)
    bank_search.require("faiss", "faiss-cpu").omp_set_num_threads(args.jobs)
    rows = []
    for spec in knn:
        n, d = (int(v) for v in spec.lower().split("x"))
        rows += bench_knn(n, d, queries, args.k, args.seed)
        print(render(with_ratios(list(rows))), "\n", flush=True)
    for n in tsne:
        rows += bench_tsne(n, args.iters, args.jobs, args.seed, args.sklearn_max)
        print(render(with_ratios(list(rows))), "\n", flush=True)
    print(f"final table ({args.jobs} threads for faiss, torch, openTSNE and scikit-learn; "
          f"CPU, {os.cpu_count()} cores):")
    print(render(with_ratios(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
