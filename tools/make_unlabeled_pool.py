"""Write an unlabeled pool D_U@Nx (imbalance rho_U, relevance) as list files and a JSON summary.

    python tools/make_unlabeled_pool.py CONFIG --out DIR [--stage NAME] [--size 4] [--rho-u 100]
        [--relevance 1.0] [--seed 0] [section.key=value ...]

The pool is the one the config's `data` (the labeled task) and `semi` sections describe, drawn
by data_pipelines/unlabeled_pool.py exactly as a training run draws it; the flags are
shorthands for semi.size, semi.rho_u, semi.relevance and semi.seed. DIR gets pool.json (request,
per-class counts, fingerprint) and pool.<part>.txt per part ('index label' for array data sets,
'relative/path label' for list/folder sources) with the source's TRUE labels, kept for analysis:
training never reads them. A run uses the files with semi.pool_file=DIR/pool.json.

A request the source cannot fill is refused (exit 1), naming each class that lacks images.
Sources: the task's own unused train images (default), another split (semi.split=extra for
SVHN), any 'path label' list (semi.source=list semi.list=...), and for the irrelevant share
the classes outside data.classes or another data set (semi.irrelevant_source=...).
"""
from __future__ import annotations

import argparse
import os
import sys


from ltrainer.data_pipelines.sources import DataError  # noqa: E402
from ltrainer.data_pipelines.unlabeled_pool import POOL_JSON, build_pool, pool_files  # noqa: E402
from ltrainer.trainer.checkpoint import atomic_write  # noqa: E402
from ltrainer.trainer.config import ConfigError  # noqa: E402
from ltrainer.trainer.pipeline import load_plan  # noqa: E402

SHORTHANDS = ("size", "rho_u", "relevance", "seed")  # flags that set semi.<same name>


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="a config (or pipeline) whose data and semi sections to use")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.rho=50")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stage", help="pipelines: the stage whose sections to use (default: last)")
    p.add_argument("--size", type=float, help="N of D_U@Nx (semi.size)")
    p.add_argument("--rho-u", type=float, help="imbalance of the pool (semi.rho_u)")
    p.add_argument("--relevance", type=float, help="share from the task's classes")
    p.add_argument("--seed", type=int, help="semi.seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + [f"semi.{key}={getattr(args, key)}"
                                        for key in SHORTHANDS if getattr(args, key) is not None]
    try:
        plan = load_plan(args.config, overrides)
        stage = plan[-1] if args.stage is None else {s.name: s for s in plan}.get(args.stage)
        if stage is None:
            raise ConfigError(f"--stage {args.stage}: no such stage (stages: "
                              f"{', '.join(s.name for s in plan)})")
        pool = build_pool(stage.cfg.data, stage.cfg.semi)
    except (ConfigError, DataError) as e:
        print(f"make_unlabeled_pool: {e}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    files = pool_files(pool)
    for name in sorted(files, key=lambda n: n == POOL_JSON):   # the summary last
        atomic_write(os.path.join(args.out, name), lambda f, t=files[name]: f.write(t.encode()))
    print(describe(pool.summary()))
    print(f"wrote {', '.join(sorted(files))} to {args.out}")
    return 0


def describe(s: dict) -> str:
    """A pool summary in a few lines."""
    r = s["request"]
    lines = [f"D_U@{r['size']:g}x of {s['labeled']['count']} labeled images: {s['total']} images "
             f"(rho_U = {r['rho_u']:g}, relevance {r['relevance']:g}, seed {r['seed']}; "
             f"fingerprint {s['fingerprint'][:12]})",
             f"  relevant per class (head first as labeled): {s['class_counts']}"]
    lines += [f"  {p['name']}: {p['count']} from {p['source']} {p['split'] or p['list']}; "
              f"source classes {p['source_class_counts']}" for p in s["parts"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
