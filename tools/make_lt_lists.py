"""Write a long-tailed training list (and its per-class counts) from a balanced source.

Output formats:
- file sources (--source list|folder): "relative/path label" per line, paths relative to the
  source's image root (read back with data_pipelines.sources.read_list_file(OUT, root)).
- array sources (fashion_mnist, cifar10, cifar100, svhn) have no file paths, so OUT holds
  "index label" lines, index = position in the full official split, after one '#' comment
  header (read back with read_index_list(OUT, source), or open_source(kind, root, split, OUT)).
Next to OUT, OUT.counts.json (OUT's ".txt" suffix replaced) holds per-class counts and totals.

Example:
    python tools/make_lt_lists.py --source cifar10 --root data --rho 100 --out lists/c10_lt.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from ltrainer.data_pipelines.longtail import (PROFILES, SVHN_CLASS_ORDER,  # noqa: E402
                                     class_counts, lt_counts, lt_indices, n_max_for)
from ltrainer.data_pipelines.sources import (SOURCE_KINDS, DataError,  # noqa: E402
                                    FileSource, open_source)


def counts_path(out: str) -> str:
    """OUT.txt -> OUT.counts.json (any other name just gets .counts.json appended)."""
    base = out[:-4] if out.endswith(".txt") else out
    return base + ".counts.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=SOURCE_KINDS)
    p.add_argument("--root", default=None,
                   help="dataset root (image root for --source list; default: list's folder)")
    p.add_argument("--list", dest="list_file", default=None,
                   help="balanced 'path label' list (required for --source list)")
    p.add_argument("--split", default="train", help="split to subsample (default: train)")
    p.add_argument("--rho", type=float, required=True, help="imbalance ratio n_max / n_min")
    p.add_argument("--n-max", type=float, default=None,
                   help="head-class count (default: N / C; 1000 for svhn as the reference)")
    p.add_argument("--profile", choices=PROFILES, default="exp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output list file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.source == "list" and not args.list_file:
        print("make_lt_lists: --source list needs --list FILE", file=sys.stderr)
        return 2
    try:
        src = open_source(args.source, args.root, args.split,
                          args.list_file if args.source == "list" else None)
        class_order = SVHN_CLASS_ORDER if args.source == "svhn" else None
        n_max = n_max_for(args.source, args.n_max)   # SVHN: the reference's 1,000
        if n_max is None:
            n_max = len(src) / src.num_classes
        counts = lt_counts(src.num_classes, n_max, args.rho, args.profile)
        idx = lt_indices(src.labels, counts, args.seed, class_order)
    except DataError as exc:
        print(f"make_lt_lists: {exc}", file=sys.stderr)
        return 1

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    labels = src.labels[idx]
    with open(args.out, "w", encoding="utf-8") as f:
        if isinstance(src, FileSource):
            fmt, root = "path_label", os.path.abspath(src.root)
            for i, y in zip(idx.tolist(), labels.tolist()):
                f.write(f"{src.paths[i]} {y}\n")
        else:
            fmt, root = "index_label", (os.path.abspath(args.root) if args.root else None)
            f.write(f"# index label; source={args.source} split={args.split} rho={args.rho:g} "
                    f"profile={args.profile} seed={args.seed}\n")
            for i, y in zip(idx.tolist(), labels.tolist()):
                f.write(f"{i} {y}\n")
    per_class = class_counts(labels, src.num_classes)
    summary = {
        "source": args.source, "split": args.split, "format": fmt, "root": root,
        "list": os.path.abspath(args.list_file) if args.list_file else None,
        "rho": args.rho, "profile": args.profile, "n_max": n_max, "seed": args.seed,
        "class_order": list(class_order) if class_order is not None
        else list(range(src.num_classes)),
        "num_classes": src.num_classes, "counts": per_class, "total": int(len(idx)),
        "source_total": len(src), "source_counts": class_counts(src.labels, src.num_classes),
    }
    with open(counts_path(args.out), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(f"{args.source} {args.split} rho={args.rho:g} {args.profile}: {len(idx)} of {len(src)} "
          f"images, per class: {per_class}")
    print(f"wrote {args.out} ({fmt}) and {counts_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
