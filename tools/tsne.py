"""t-SNE of train and test features coloured by class, head and tail classes marked, as in
the paper's Figures 1 and 4; and the same for two checkpoints side by side.

    python tools/tsne.py plot RUN --out tsne.png
    python tools/tsne.py plot --train BANK --test BANK --out tsne.png
    python tools/tsne.py compare RUN_A RUN_B --out compare.png [--names CE "CE + SSP"]

As in the paper, train and test points of one model are embedded together (one map, so the
decision regions are the same in both panels). Neighbours come from faiss (exact L2 on the
L2-normalized features), handed to openTSNE as precomputed neighbours. Large banks are
sub-sampled at random with a per-class floor, so tail classes are not lost; the figure says
how many points of how many it shows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


import numpy as np  # noqa: E402

from ltrainer.data_pipelines.sources import DataError  # noqa: E402
from ltrainer.trainer.banks import analysis as bank_analysis  # noqa: E402
from ltrainer.trainer.banks import extract as bank_extract  # noqa: E402
from ltrainer.trainer.banks import files as bank_files  # noqa: E402
from ltrainer.trainer.banks import plots as bank_plots  # noqa: E402
from ltrainer.trainer.banks import search as bank_search  # noqa: E402
from ltrainer.trainer.config import ConfigError  # noqa: E402


def subsample(labels: np.ndarray, max_n: int, seed: int = 0, min_per_class: int = 50):
    """Sorted rows: at most `max_n`, random, but every class keeps min(its size, floor)."""
    n = len(labels)
    if max_n <= 0 or n <= max_n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    floor = min(min_per_class, max_n // len(classes))
    perm = rng.permutation(n)
    picked = np.zeros(n, dtype=bool)
    for c in classes:
        picked[perm[labels[perm] == c][:floor]] = True
    rest = perm[~picked[perm]][:max_n - picked.sum()]
    picked[rest] = True
    return np.flatnonzero(picked)


def faiss_neighbors(x: np.ndarray, k: int):
    """(indices, distances) of each row's k nearest other rows: exact L2 with faiss, self
    dropped, squared distances turned into distances (what openTSNE expects)."""
    index = bank_search.build_index(x, "flat", metric="l2")
    d2, ids = bank_search.search_excluding_self(index, x, k, np.arange(len(x)))
    return ids.astype(np.int64), np.sqrt(np.maximum(d2, 0)).astype(np.float64)


def embed(x: np.ndarray, perplexity: float = 30, iters: int = 750, seed: int = 0,
          n_jobs: int = 1) -> np.ndarray:
    """2-D openTSNE embedding from faiss neighbours (k = 3 x perplexity, as openTSNE picks);
    the first 250 iterations (or a third, if fewer) are early exaggeration."""
    affinity = bank_search.require("openTSNE.affinity", "opentsne")
    nn = bank_search.require("openTSNE.nearest_neighbors", "opentsne")
    otsne = bank_search.require("openTSNE", "opentsne")
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(len(x) - 1, int(3 * perplexity))
    ids, dist = faiss_neighbors(x, k)
    aff = affinity.PerplexityBasedNN(knn_index=nn.PrecomputedNeighbors(ids, dist),
                                     perplexity=min(perplexity, k / 3), n_jobs=n_jobs)
    early = min(250, iters // 3)
    tsne = otsne.TSNE(early_exaggeration_iter=early, n_iter=iters - early, n_jobs=n_jobs,
                      random_state=seed)
    return np.asarray(tsne.fit(x, affinities=aff))


class Panel:
    """One model's joint train+test embedding, ready to draw."""

    def __init__(self, name, train: bank_files.Bank, test: bank_files.Bank, args):
        bank_files.check_compatible(test, train)
        self.name, self.args = name, args
        self.counts = train.train_class_counts
        self.head, self.tail, self.rule = bank_analysis.head_tail_classes(self.counts)
        self.rows = {"train": subsample(train.labels, args.max_train, args.seed,
                                        args.min_per_class),
                     "test": subsample(test.labels, args.max_test, args.seed,
                                       args.min_per_class)}
        self.totals = {"train": len(train), "test": len(test)}
        self.labels = {"train": train.labels[self.rows["train"]],
                       "test": test.labels[self.rows["test"]]}
        x = np.concatenate([train.features[self.rows["train"]],
                            test.features[self.rows["test"]]]).astype(np.float32)
        x = bank_search.normalized(x) if args.normalize else x
        t0 = time.perf_counter()
        y = embed(x, args.perplexity, args.iters, args.seed, args.jobs)
        self.seconds = time.perf_counter() - t0
        self.xy = {"train": y[:len(self.rows["train"])], "test": y[len(self.rows["train"]):]}

    def caption(self) -> str:
        n = {s: f"{len(self.rows[s])}" + ("" if len(self.rows[s]) == self.totals[s]
                                         else f" of {self.totals[s]}") for s in self.rows}
        sub = any(len(self.rows[s]) < self.totals[s] for s in self.rows)
        how = (f" (random sub-sample, >= {self.args.min_per_class} per class where available, "
               f"seed {self.args.seed})") if sub else ""
        return (f"{self.name}: {n['train']} train + {n['test']} test points{how}; "
                f"{self.rule}: head {bank_analysis.describe_ids(self.head)}, "
                f"tail {bank_analysis.describe_ids(self.tail)}")


def colors_for(num_classes: int):
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](c) for c in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](c) for c in range(num_classes)]
    return [colormaps["turbo"](c / (num_classes - 1)) for c in range(num_classes)]


def draw(ax, panel: Panel, split: str):
    """Scatter coloured by class; head classes as small dots, tail classes as larger
    black-edged triangles drawn on top, so tail leakage into head regions shows."""
    xy, labels, k = panel.xy[split], panel.labels[split], len(panel.counts)
    colors = colors_for(k)
    order = sorted(range(k), key=lambda c: c in panel.tail)  # tail last, on top
    for c in order:
        m = labels == c
        if not m.any():
            continue
        role = "tail" if c in panel.tail else "head" if c in panel.head else "mid"
        style = dict(marker="^", s=16, edgecolors="black", linewidths=0.3) if role == "tail" \
            else dict(marker="o", s=4 if role == "head" else 6, linewidths=0)
        ax.scatter(xy[m, 0], xy[m, 1], color=colors[c], alpha=0.8, rasterized=True,
                   label=f"{c} ({role}, n={panel.counts[c]})" if k <= 20 else None, **style)
    ax.set_title(f"{panel.name}: {split} ({len(labels)} points)", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def figure(panels: list[Panel], out: str, title: str = "") -> str:
    """One model: train | test. Several: one column per model (side by side), train on top
    and test below."""
    cols = 2 if len(panels) == 1 else len(panels)
    rows = 1 if len(panels) == 1 else 2
    fig = bank_plots._figure((5.5 * cols + 2, 5 * rows + 1))
    for i, p in enumerate(panels):
        for j, split in enumerate(("train", "test")):
            pos = j + 1 if len(panels) == 1 else j * cols + i + 1
            draw(fig.add_subplot(rows, cols, pos), p, split)
    handles, names = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="center right", fontsize=8, markerscale=2,
                   title="class (role, train images)")
    a = panels[0].args
    notes = [p.caption() for p in panels] + [
        f"openTSNE, perplexity {a.perplexity}, {a.iters} iterations, faiss exact kNN on "
        f"{'L2-normalized ' if a.normalize else ''}features; train and test embedded jointly"]
    fig.suptitle(title or "t-SNE of train and test features", fontsize=12)
    fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.03 + 0.015 * len(notes), 0.82 if handles else 1, 0.97))
    fig.savefig(out, dpi=110)
    return out


def run_banks(run: str, args) -> tuple[bank_files.Bank, bank_files.Bank]:
    kw = dict(layer=args.layer, checkpoint=getattr(args, "checkpoint", None))
    return bank_extract.run_bank(run, "train", **kw), bank_extract.run_bank(run, args.split, **kw)


def cmd_plot(args) -> list[Panel]:
    if args.run:
        train, test = run_banks(args.run, args)
        name = args.name or os.path.basename(os.path.abspath(args.run))
    elif args.train and args.test:
        train, test = bank_files.load_bank(args.train), bank_files.load_bank(args.test)
        name = args.name or os.path.basename(os.path.abspath(args.train))
    else:
        raise SystemExit("give RUN, or both --train BANK and --test BANK")
    panels = [Panel(name, train, test, args)]
    report(panels, figure(panels, args.out, args.title))
    return panels


def cmd_compare(args) -> list[Panel]:
    names = args.names or [os.path.basename(os.path.abspath(r)) for r in (args.run_a, args.run_b)]
    ckpts = args.checkpoints or [None, None]
    banks = []
    for run, ckpt in zip((args.run_a, args.run_b), ckpts):  # all banks first: fail fast
        args.checkpoint = ckpt
        banks.append(run_banks(run, args))
    panels = [Panel(name, train, test, args) for name, (train, test) in zip(names, banks)]
    report(panels, figure(panels, args.out, args.title or f"t-SNE: {names[0]} vs {names[1]}"))
    return panels


def report(panels, out):
    for p in panels:
        print(f"{p.caption()}  [t-SNE {p.seconds:.1f} s]")
    print(f"figure: {out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("plot", help="one model: train and test panels")
    one.add_argument("run", nargs="?", help="run folder")
    one.add_argument("--train", help="train bank (instead of a run folder)")
    one.add_argument("--test", help="test bank")
    one.add_argument("--checkpoint")
    one.add_argument("--name")
    one.set_defaults(fn=cmd_plot)
    two = sub.add_parser("compare", help="two models, one row each")
    two.add_argument("run_a")
    two.add_argument("run_b")
    two.add_argument("--names", nargs=2)
    two.add_argument("--checkpoints", nargs=2, help="checkpoint files of A and B")
    two.set_defaults(fn=cmd_compare)
    for s in (one, two):
        s.add_argument("--out", required=True, help="PNG file")
        s.add_argument("--title", default="")
        s.add_argument("--layer", default="features")
        s.add_argument("--split", default="test", help="the query split of a run")
        s.add_argument("--max-train", type=int, default=5000, help="0 = all points")
        s.add_argument("--max-test", type=int, default=5000, help="0 = all points")
        s.add_argument("--min-per-class", type=int, default=50)
        s.add_argument("--perplexity", type=float, default=30.0)
        s.add_argument("--iters", type=int, default=750, help="including 250 exaggerated")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
        s.add_argument("--no-normalize", dest="normalize", action="store_false",
                       help="use raw instead of L2-normalized features")
    return p.parse_args(argv)


# Errors a user can fix (a missing run or bank, a missing package, bad data or config): one line.
USER_ERRORS = (bank_files.BankError, ImportError, DataError, ConfigError)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
