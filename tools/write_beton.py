#!/usr/bin/env python3
"""Convert a list file, a built-in data set or a config's data sets to FFCV .beton files.

    python tools/write_beton.py --list data/ImageNet_LT_train.txt --root data/imagenet \\
        --max-side 512 --jpeg-quality 90 --out data/betons/imagenet_lt_train.beton
    python tools/write_beton.py --source fashion_mnist --split test --out /tmp/fm_test.beton
    python tools/write_beton.py --config configs/fmnist_lt_ce_ffcv.yaml [key=value ...]

--config writes every data set the config trains and evaluates on (after long-tail
subsetting) into its data.beton_dir, under the names the FFCV loader looks for, so training
starts without a conversion step; the loader would otherwise write them on first use.

Settings (measured by tools/bench_loaders.py on 2,000 ImageNet-shaped photo-like JPEGs,
~108 KB each, RandomResizedCrop 224, 2 threads; README "Benchmarks"): --mode raw stores the
decoded pixels: lossless and the fastest (0.8 CPU ms an image against 1.6 for jpg at quality
90, which is about the cost of decoding the original files once), at ~7.6x the size (1,216
against 160 MiB here; ~60 GB for ImageNet-LT train at ImageNet's sizes). Choose raw when the
.beton fits on the local disk and, for full speed, in the page cache; else jpg at quality 90
(the default for image files: FFCV's choice for ImageNet); --max-side bounds larger images
such as iNaturalist's (800 px), at some cost in fidelity (not measured here).

A progress bar shows the conversion. The .beton appears under its final name only once it is
complete (it is written under a temporary name and renamed), so an interrupted or failed run
never leaves a half-written file there. An image that cannot be decoded stops the run with
its path (and list line), unless --skip-bad stores it as a placeholder that the loader
skips (with data.on_bad_image: skip) and lists it in the side file <out>.json.
"""
from __future__ import annotations

import argparse
import os
import sys


from ltrainer.data_pipelines.sources import DataError  # noqa: E402


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", help="a 'relative/path label' list file")
    what.add_argument("--source", help="a built-in data set: fashion_mnist, cifar10, cifar100, "
                                       "svhn, folder")
    what.add_argument("--config", help="a training config: write all of its data sets")
    p.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")
    p.add_argument("--root", help="image root of --list (default: the list's folder) or data "
                                  "root of --source")
    p.add_argument("--split", default="train", help="split of --source (default train)")
    p.add_argument("--out", help="output .beton (default: <beton-dir>/<fingerprint>.beton)")
    p.add_argument("--beton-dir", default=None, help="output folder when --out is not given "
                                                     "(default: the config's, or data/betons)")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink images whose longer side exceeds this (default: keep)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--mode", default="auto", choices=("auto", "raw", "jpg", "smart"),
                   help="pixel storage: auto = raw for in-memory data sets, jpg for files; "
                        "raw = ~2x faster loading at ~7.6x the size (see above)")
    p.add_argument("--workers", type=int, default=0, help="writer processes (default: cores)")
    p.add_argument("--skip-bad", action="store_true",
                   help="store unreadable images as placeholders instead of stopping")
    p.add_argument("--force", action="store_true", help="rewrite an existing .beton")
    args = p.parse_args(argv)
    if args.overrides and not args.config:
        p.error("key=value overrides need --config")
    if args.config and args.out:
        p.error("--config writes several files under data.beton_dir; use --beton-dir, not --out")
    return args


def _datasets(args):
    """[(label for messages, source, beton_dir)] for what the arguments name."""
    from ltrainer.data_pipelines.loaders import DEFAULT_BETON_DIR
    from ltrainer.data_pipelines.sources import open_source, read_list_file

    if args.list:
        return [(args.list, read_list_file(args.list, args.root), args.beton_dir)]
    if args.source:
        return [(f"{args.source} {args.split}", open_source(args.source, args.root, args.split),
                 args.beton_dir)]
    from ltrainer.data_pipelines.build import build_data
    from ltrainer.trainer.pipeline import load_plan

    plan = load_plan(args.config, args.overrides)   # a plain config is a one-stage plan
    out, seen = [], set()
    for stage in plan:   # each distinct data section once (stages often share theirs)
        cfg = stage.cfg
        key = repr([(k, v) for k, v in sorted(cfg.data.items()) if k not in PER_STAGE])
        if (key, cfg.eval.split) in seen:
            continue
        seen.add((key, cfg.eval.split))
        bundle = build_data(cfg.data, eval_splits=(cfg.eval.split,))
        directory = args.beton_dir or cfg.data.beton_dir or DEFAULT_BETON_DIR
        name = f"stage '{stage.name}' " if len(plan) > 1 else ""
        out.append((f"{name}train", bundle.train.source, directory))
        out += [(f"{name}{split}", bundle.eval_dataset(split).source, directory)
                for split in bundle.evals]
    return out


# data.* keys that change the batches or the pixels' augmentation, not the images stored
PER_STAGE = ("batch_size", "eval_batch_size", "workers", "augment", "dali_threads")


def main(argv=None) -> int:
    args = _parse(argv)
    from ltrainer.data_pipelines.loaders import DEFAULT_BETON_DIR, require_backend
    from ltrainer.trainer.config import ConfigError

    try:
        require_backend("ffcv")
        from ltrainer.data_pipelines.ffcv_loader import beton_path_for, write_beton

        written = set()
        for name, source, directory in _datasets(args):
            path = args.out or beton_path_for(source, directory or DEFAULT_BETON_DIR)
            if path in written:   # the same images as an earlier stage's
                continue
            written.add(path)
            if os.path.exists(path) and not args.force:
                print(f"{name}: {path} exists (--force rewrites it)")
                continue
            print(f"{name}: writing {len(source)} images to {path}", flush=True)
            meta = write_beton(source, path, max_side=args.max_side,
                               jpeg_quality=args.jpeg_quality, mode=args.mode,
                               workers=args.workers,
                               on_bad_image="skip" if args.skip_bad else "fail")
            size = os.path.getsize(path) / 2 ** 20
            note = f", {len(meta['bad'])} unreadable image(s) skipped" if meta["bad"] else ""
            print(f"{name}: wrote {path} ({size:.1f} MiB, mode {meta['mode']}{note})")
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
