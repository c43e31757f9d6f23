"""Check a data set's split lists: every line of every split, all problems at once.

    python tools/check_lists.py --config configs/imagenet_lt_moco_crt.yaml data.root=/data/ilsvrc \
        data.train_list=... data.val_list=... data.test_list=...
    python tools/check_lists.py --root /data/ilsvrc --train ImageNet_LT_train.txt \
        --val ImageNet_LT_val.txt --test ImageNet_LT_test.txt --num-classes 1000

Prints per split: images, classes, min/median/max images per class, many/medium/few classes
(eval.many / eval.few, by training counts) and whether the file is an official ImageNet-LT /
iNaturalist 2018 list (by its git blob SHA-1) or how it differs from the one it resembles;
then every problem: malformed lines (file:line), labels out of range, classes without
images, duplicates, images shared by two splits, images missing from a random sample of
--sample, and --decode images that PIL cannot read. Exit 2 when there is any problem.
Flags override the config's keys (--train is data.train_list, and so on).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


from ltrainer.data_pipelines.list_check import check_data_section  # noqa: E402
from ltrainer.trainer.config import ConfigError  # noqa: E402

KEYS = ("source", "root", "train_list", "val_list", "test_list", "num_classes", "classes",
        "check_files")
FLAG_KEYS = {"root": "data.root", "train": "data.train_list", "val": "data.val_list",
             "test": "data.test_list", "num_classes": "data.num_classes"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="with --config: dotted overrides, data.root=...")
    p.add_argument("--config", help="a config or pipeline; its data section names the lists")
    p.add_argument("--root", help="image root the list paths are relative to (data.root)")
    p.add_argument("--train", help="train list (data.train_list)")
    p.add_argument("--val", help="val list (data.val_list)")
    p.add_argument("--test", help="test list (data.test_list)")
    p.add_argument("--num-classes", type=int, help="label range (default: largest label + 1)")
    p.add_argument("--classes", type=int, nargs="+", help="only these labels (data.classes)")
    p.add_argument("--many", type=int, default=100, help="many-shot: more train images than this")
    p.add_argument("--few", type=int, default=20, help="few-shot: fewer train images than this")
    p.add_argument("--sample", type=int, default=1000, help="images to stat (random sample)")
    p.add_argument("--all-files", action="store_true", help="stat every listed image")
    p.add_argument("--decode", type=int, default=8, help="images to decode with PIL")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    return p.parse_args(argv)


def data_sections(args) -> list[tuple]:
    """The distinct (data section, eval.many, eval.few) to check: from the config's stages,
    or from the flags."""
    flags = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    if not args.config:
        if args.overrides:
            raise ConfigError(f"command line: overrides {' '.join(args.overrides)} need --config")
        data = {"source": "list", "classes": args.classes, "root": flags.get("root"),
                "num_classes": args.num_classes,
                **{f"{s}_list": flags.get(s) for s in ("train", "val", "test")}}
        return [(data, args.many, args.few)]
    from ltrainer.trainer.pipeline import load_plan

    overrides = list(args.overrides) + [f"{FLAG_KEYS[k]}={v}" for k, v in flags.items()]
    if args.classes:
        overrides.append(f"data.classes=[{','.join(map(str, args.classes))}]")
    out = []
    for stage in load_plan(args.config, overrides):
        d = {k: stage.cfg.data[k] for k in KEYS}
        if d["source"] != "list":
            raise ConfigError(f"{args.config}: data.source = {d['source']!r}; only 'list' "
                              f"sources have list files to check")
        if (d, stage.cfg.eval.many, stage.cfg.eval.few) not in out:
            out.append((d, stage.cfg.eval.many, stage.cfg.eval.few))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sections = data_sections(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if not any(d[f"{s}_list"] for d, _, _ in sections for s in ("train", "val", "test")):
        print("check_lists: no list given; use --config or --train/--val/--test",
              file=sys.stderr)
        return 2
    status = 0
    for data, many, few in sections:
        start = time.perf_counter()
        report = check_data_section(data, many, few, sample=args.sample, decode=args.decode,
                                    seed=args.seed, check_all_files=args.all_files
                                    or bool(data.get("check_files")))
        print(report.summary())
        print(f"checked in {time.perf_counter() - start:.1f} s")
        status = max(status, 0 if report.ok else 2)
    return status


if __name__ == "__main__":
    sys.exit(main())
