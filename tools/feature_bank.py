"""Feature banks of any checkpoint: extract them, measure kNN accuracy, inspect neighbours,
tail-class leakage and classifier weight norms. The work is done in trainer/feature_bank.py.

    python tools/feature_bank.py extract --run RUN [--split test|train] [--list FILE]
        [--layer features|logits|head|MODULE] [--checkpoint FILE] [--dtype float16] [--nproc N]
    python tools/feature_bank.py knn (--run RUN | --query BANK --ref BANK) [--k 20]
        [--temperature 0.1] [--index flat|ivf] [--nlist N] [--nprobe 16]
    python tools/feature_bank.py inspect neighbors (--run RUN | --query BANK --ref BANK)
        (--sample ROW ... | --class C [--n 4]) [--k 8] [--grid grid.png]
    python tools/feature_bank.py inspect leakage (--run RUN | --query BANK --ref BANK) [--k 10]
    python tools/feature_bank.py inspect weights --run RUN [--out weight_norms.png]

With --run, the reference bank is the run's (long-tailed) train split and the query bank its
test split, both extracted on first use and cached in RUN/feature_banks/. Under torchrun,
`extract` shards the chunks over the ranks; a killed extraction resumes when re-run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


from ltrainer.data_pipelines.sources import DataError  # noqa: E402
from ltrainer.trainer.banks import analysis as bank_analysis  # noqa: E402
from ltrainer.trainer.banks import extract as bank_extract  # noqa: E402
from ltrainer.trainer.banks import files as bank_files  # noqa: E402
from ltrainer.trainer.banks import plots as bank_plots  # noqa: E402
from ltrainer.trainer.banks import runs as bank_runs  # noqa: E402
from ltrainer.trainer.banks import search as bank_search  # noqa: E402
from ltrainer.trainer import knn  # noqa: E402
from ltrainer.trainer.config import ConfigError  # noqa: E402


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else
                                            f"{v:.2f}" if isinstance(v, float) else str(v)
                                            for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def add_bank_args(p):
    p.add_argument("--run", help="run folder (config.yaml + model_final.pt)")
    p.add_argument("--checkpoint", help="with --run: another checkpoint of the run")
    p.add_argument("--layer", default="features",
                   help="with --run: features, logits, head or a module name")
    p.add_argument("--split", default="test", help="with --run: the query split")
    p.add_argument("--query", help="query bank folder")
    p.add_argument("--ref", help="reference bank folder")


def banks(args) -> tuple[bank_files.Bank, bank_files.Bank]:
    """(query, reference) from --query/--ref, or from a run folder's test/train banks."""
    if args.run:
        kw = dict(layer=args.layer, checkpoint=args.checkpoint)
        return bank_extract.run_bank(args.run, args.split, **kw), bank_extract.run_bank(args.run, "train", **kw)
    if not (args.query and args.ref):
        raise SystemExit("give --run RUN, or both --query BANK and --ref BANK")
    return bank_files.load_bank(args.query), bank_files.load_bank(args.ref)


def cmd_extract(args):
    ckpt = args.checkpoint or bank_runs.default_checkpoint(args.run)
    out = args.out or bank_extract.run_bank_path(args.run, args.split, args.layer, ckpt, args.list)
    bank_extract.extract_run_ddp(args.nproc, run_dir=args.run, out=out, split=args.split,
                       layer=args.layer, checkpoint=ckpt, list_file=args.list,
                       overrides=args.set, dtype=args.dtype, chunk_size=args.chunk_size,
                       batch_size=args.batch_size, workers=args.workers, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        b = bank_files.load_bank(out)
        print(f"bank {out}: {len(b)} x {b.header['dim']} {b.header['dtype']} "
              f"({b.header['layer']} of {b.header['checkpoint']})")


def cmd_knn(args):
    query, ref = banks(args)
    r = bank_search.knn_evaluate(query, ref, k=args.k, temperature=args.temperature, index=args.index,
                        nlist=args.nlist, nprobe=args.nprobe, device=args.device,
                        recall_queries=args.recall_queries)
    print(f"kNN (k={r['k']}, T={r['temperature']}, cosine, {r['index']}"
          f"{' on GPU' if r['gpu'] else ''}): {r['queries']} queries from {query.path} "
          f"against {r['references']} references from {ref.path}"
          f"{' (leave-one-out)' if r['leave_one_out'] else ''}")
    print(table([[r["top1"], r["balanced_top1"], r["many"], r["medium"], r["few"],
                  r["search_seconds"]]],
                ["top-1 %", "balanced %", "many %", "medium %", "few %", "search s"]))
    if "recall" in r:
        print(f"IVF nlist={r['nlist']} nprobe={r['nprobe']}: recall@{r['k']} against exact "
              f"search {r['recall']:.4f}")
    dump(args.json, r)


def cmd_neighbors(args):
    query, ref = banks(args)
    if args.sample:
        rows = args.sample
    elif args.cls is not None:
        rows = [int(i) for i in (query.labels == args.cls).nonzero()[0][:args.n]]
        if not rows:
            raise SystemExit(f"class {args.cls} has no samples in {query.path}")
    else:
        raise SystemExit("give --sample ROW or --class C")
    results = bank_analysis.nearest_neighbors(query, ref, rows, k=args.k)
    for r in results:
        print(f"\nquery row {r['row']} (class {r['label']}): {r['path']}")
        print(table([[i + 1, n["label"], f"{n['distance']:.4g}", n["path"]]
                     for i, n in enumerate(r["neighbors"])],
                    ["rank", "class", "cos dist", "path"]))
    if args.grid:
        bank_plots.plot_neighbor_grid(results, query, ref, args.grid)
        print(f"image grid: {args.grid}")
    dump(args.json, results)


def cmd_leakage(args):
    query, ref = banks(args)
    rep = bank_analysis.leakage_report(query, ref, k=args.k, head=args.head, tail=args.tail)
    print(f"leakage of tail classes (k={rep['k']}; head {bank_analysis.describe_ids(rep['head'])}, "
          f"tail {bank_analysis.describe_ids(rep['tail'])}: {rep['rule']}); a sample leaks when more "
          f"than half its neighbours are head-class")
    rows = [[c, v["samples"], v["leaked_share"], v.get("head_neighbor_share"),
             v.get("own_class_neighbor_share"), v.get("top_head_class"),
             v.get("nearest_head_class"), g4(v.get("centroid_distance_to_nearest_head"))]
            for c, v in rep["per_class"].items()]
    print(table(rows, ["tail class", "samples", "leaked share", "head nbr share",
                       "own nbr share", "top head", "nearest head centroid", "centroid dist"]))
    dump(args.json, rep)


def cmd_weights(args):
    ckpt = args.checkpoint or bank_runs.default_checkpoint(args.run)
    norms, key = bank_analysis.classifier_weight_norms(bank_runs.load_model_state(ckpt), args.key)
    counts = bank_runs.run_class_counts(args.run)
    out = args.out or os.path.join(args.run, "weight_norms.png")
    bank_plots.plot_weight_norms(norms, counts, out, title=f"{os.path.basename(os.path.abspath(args.run))}"
                                                   f": ||w_c|| of {key}")
    from scipy.stats import spearmanr

    print(table([[c, n, float(w)] for c, (n, w) in enumerate(zip(counts, norms))],
                ["class", "train images", "weight norm"]))
    print(f"Spearman correlation of ||w_c|| with training images: "
          f"{spearmanr(norms, counts)[0]:.3f} (near 1: the head-biased norms tau-norm corrects)")
    print(f"plot: {out}")


def g4(v):
    return None if v is None else f"{v:.4g}"


def dump(path, obj):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
        print(f"json: {path}")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("extract", help="features of a checkpoint on a split or list file")
    e.add_argument("--run", required=True)
    e.add_argument("--checkpoint", help="default RUN/model_final.pt; an unfinished run's "
                   "RUN/checkpoint_last.pt only when named here")
    e.add_argument("--split", default="test", help="train (the run's LT subset), test or val")
    e.add_argument("--list", help="a list file to read instead of the split's own")
    e.add_argument("--layer", default="features")
    e.add_argument("--out", help="bank folder; default RUN/feature_banks/CKPT-SPLIT-LAYER")
    e.add_argument("--dtype", default="float32", choices=bank_files.DTYPES)
    e.add_argument("--chunk-size", type=int, default=4096, help="samples per resumable chunk")
    e.add_argument("--batch-size", type=int, help="default data.eval_batch_size")
    e.add_argument("--workers", type=int)
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--nproc", type=int, default=1, help="local DDP processes")
    e.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dataset overrides, e.g. data.source=svhn data.root=/data/svhn")
    e.set_defaults(fn=cmd_extract)

    k = sub.add_parser("knn", help="kNN accuracy of a query bank against a reference bank")
    add_bank_args(k)
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=knn.DEFAULT_T,
                   help="the kNN monitor's knn.t (trainer/knn.py): the same vote")
    k.add_argument("--index", default="flat", choices=("flat", "ivf"))
    k.add_argument("--nlist", type=int, help="IVF lists; default ~4 sqrt(N)")
    k.add_argument("--nprobe", type=int, default=16)
    k.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    k.add_argument("--recall-queries", type=int, default=1000)
    k.add_argument("--json")
    k.set_defaults(fn=cmd_knn)

    i = sub.add_parser("inspect", help="neighbours, leakage, weight norms")
    isub = i.add_subparsers(dest="what", required=True)
    n = isub.add_parser("neighbors", help="nearest neighbours of samples or of a class")
    add_bank_args(n)
    n.add_argument("--sample", type=int, nargs="*", help="query bank rows")
    n.add_argument("--class", dest="cls", type=int, help="the first --n samples of a class")
    n.add_argument("--n", type=int, default=4)
    n.add_argument("--k", type=int, default=8)
    n.add_argument("--grid", help="PNG of the query and neighbour images")
    n.add_argument("--json")
    n.set_defaults(fn=cmd_neighbors)
    lk = isub.add_parser("leakage", help="tail-class samples among head-class neighbours")
    add_bank_args(lk)
    lk.add_argument("--k", type=int, default=10)
    lk.add_argument("--head", type=ints, help="head classes, e.g. 0,1,2 (default many-shot)")
    lk.add_argument("--tail", type=ints, help="tail classes (default few-shot)")
    lk.add_argument("--json")
    lk.set_defaults(fn=cmd_leakage)
    w = isub.add_parser("weights", help="per-class classifier weight norms as a plot")
    w.add_argument("--run", required=True)
    w.add_argument("--checkpoint")
    w.add_argument("--key", help="state_dict key of the classifier weight")
    w.add_argument("--out", help="PNG; default RUN/weight_norms.png")
    w.set_defaults(fn=cmd_weights)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        args.fn(args)
    except (bank_files.BankError, ImportError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from ltrainer.trainer import distributed as dist_utils
        dist_utils.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
