#!/usr/bin/env python3
"""DALI's CPU cost by pipeline part: CPU ms per image of bare CPU pipelines and of DaliLoader.

    python tools/profile_dali.py                       # photo set, 3 rounds
    python tools/profile_dali.py --sets photo --rounds 3 --work-dir /tmp/prof

Why: the DALI backend's train graph (data_pipelines/dali_graph.py) is ROI decode of the seeded
window + resize + normalise; bench_loaders.py times it whole. This tells which part costs what,
whether the feeder's seeded windows (decoders.image_slice) cost more than DALI's own
image_random_crop, what the resize filter costs (the graph's linear + antialias against
triangular, cubic, Lanczos and linear without antialias), whether MoCo's window as the
resize's region of interest beats slice + resize, and whether DALI threads and the prefetch
depth matter. README's Benchmarks section (the DALI bullet) quotes its table.

Rows 'bare: ...' are DALI pipelines fed the set's JPEG bytes from memory and the windows the
DALI feeder would draw (dali_graph.window_draws from per-sample seeds), one pass over the set
per round; a '+' row adds one operator to its base (the ROI decode; the graph's resize for
'+ normalise'), and its "part" column is its CPU over the base's. Rows
'DaliLoader ...' are the backend's loader itself (files read from disk, header parsing,
read-ahead) over the same set, one epoch per round, at --threads and prefetch (pipeline queue
and read-ahead depth) settings of the sweep. Rows alternate round by round, so load from
other work hits them alike; CPU time (all threads of this process) is the steadier measure on
a loaded machine, img/s swings more.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np

GRAPH = "+ normalise: the seeded train graph (dali_graph.graph)"
IMAGENET = {"augment": "imagenet", "image_size": 224, "stats": "imagenet", "source": "list"}
FILTERS = {   # resize variants after the ROI decode; the graph's own is dali_graph.RESIZE
    "triangular": {"interp_type": "INTERP_TRIANGULAR"},
    "cubic": {"interp_type": "INTERP_CUBIC"},
    "lanczos": {"interp_type": "INTERP_LANCZOS3"},
    "linear, no antialias": {"interp_type": "INTERP_LINEAR", "antialias": False},
}


class Batches:
    """One pass over in-memory JPEGs per iter(): (bytes, mirror, *window_draws) per batch,
    drawn once up front so the timed passes spend nothing on feeding."""

    def __init__(self, datas, sizes, spec, batch):
        from ltrainer.data_pipelines.dali_graph import window_draws
        from ltrainer.data_pipelines.samplers import sample_seeds

        seeds = sample_seeds(0, 0, np.arange(len(datas)))
        self.batches = []
        for b in range(0, len(datas) - batch + 1, batch):   # full batches only
            idx = list(range(b, b + batch))
            mirror = [np.array(int(s) & 1, np.int32) for s in seeds[idx].tolist()]
            self.batches.append(([datas[i] for i in idx], mirror,
                                 *window_draws(spec, seeds[idx], [sizes[i] for i in idx])))

    def __iter__(self):
        return iter(self.batches)


def bare(kind, datas, sizes, batch, threads, resize=None):
    """A CPU pipeline of one variant: decode, slice (ROI decode), resize, train (the graph),
    random_crop (DALI's RNG), moco_slice / moco_roi (two views: slice + resize, or the graph's
    window-as-ROI resize)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from ltrainer.data_pipelines.augment import RRC_RATIO, augment_spec
    from ltrainer.data_pipelines.dali_graph import RESIZE, _normalize, graph

    # Variants leave some of the (precomputed, so free) source outputs unused; DALI warns.
    warnings.filterwarnings("ignore", message="The external source node")
    moco = kind.startswith("moco")
    spec = augment_spec({**IMAGENET, "augment": "moco" if moco else "imagenet"}, True, 3)
    feed = Batches(datas, sizes, spec, batch)
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=None, seed=1,
                    prefetch_queue_depth=2)
    with pipe:
        raw, mirror, *drawn = fn.external_source(
            source=feed, num_outputs=2 + 2 * spec.views, batch=True, cycle="raise",
            dtype=[types.UINT8] + [types.INT32] * (1 + 2 * spec.views))
        windows = list(zip(drawn[::2], drawn[1::2]))
        roi = dict(axis_names="HW", normalized_anchor=False, normalized_shape=False)
        size = dict(resize_x=spec.size, resize_y=spec.size)
        if kind in ("train", "moco_roi"):
            out = graph(spec, raw, True, 3, False, None, mirror, windows=windows)
        elif kind == "decode":
            out = fn.decoders.image(raw, adjust_orientation=False)
        elif kind == "moco_slice":
            img = fn.decoders.image(raw, adjust_orientation=False)
            out = fn.stack(*[fn.transpose(fn.resize(fn.slice(img, *w, **roi), **size, **RESIZE),
                                          perm=[2, 0, 1]) for w in windows])
        elif kind == "random_crop":
            img = fn.decoders.image_random_crop(raw, random_area=list(spec.crop_scale),
                                                random_aspect_ratio=list(RRC_RATIO))
            out = _normalize(fn.resize(img, **size, **RESIZE), spec, mirror=mirror)
        else:   # slice, resize
            out = fn.decoders.image_slice(raw, *windows[0], adjust_orientation=False, **roi)
            if kind == "resize":
                kw = {k: getattr(types, v) if isinstance(v, str) else v
                      for k, v in (resize or RESIZE).items()}
                out = fn.resize(out, **size, **kw)
        pipe.set_outputs(out)
    pipe.build()
    return pipe


class BareRun:
    def __init__(self, *args, **kwargs):
        self.pipe = bare(*args, **kwargs)

    def run(self) -> int:
        """One pass; the source ends it, so nothing of it runs on into the next row's time."""
        n = 0
        try:
            while True:
                n += len(self.pipe.run()[0])
        except StopIteration:
            self.pipe.reset()
        return n


class LoaderRun:
    """DaliLoader (the imagenet train recipe) over the set's files, one epoch per run."""

    def __init__(self, src, batch, threads, prefetch):
        from ltrainer.data_pipelines.augment import augment_spec
        from ltrainer.data_pipelines.dali_loader import DaliLoader
        from ltrainer.data_pipelines.datasets import AugmentedDataset
        from ltrainer.data_pipelines.samplers import build_sampler

        self.sampler = build_sampler("uniform", src.labels, batch_size=batch, seed=0)
        self.loader = DaliLoader(AugmentedDataset(src, None), self.sampler, batch,
                                 augment_spec(IMAGENET, True, 3), threads=threads,
                                 prefetch=prefetch)
        self.epoch = 0

    def run(self) -> int:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return sum(len(y) for _, y in self.loader)


def rows(src, batch, threads):
    """(name, base row or None, runner) per row, in table order."""
    from ltrainer.data_pipelines.dali_graph import image_size

    datas = [np.fromfile(src.full_path(i), np.uint8) for i in range(len(src))]
    sizes = [image_size(d, True) for d in datas]
    bad = [f"{src.full_path(i)}: {why}" for i, (_, why) in enumerate(sizes) if why]
    if bad:
        raise SystemExit(f"{len(bad)} image(s) without a readable size, first: {bad[0]}")
    sizes = [hw for hw, _ in sizes]
    b = (datas, sizes, batch, threads)
    roi, res = "bare: ROI decode (image_slice, seeded window)", "+ resize, linear + antialias"
    out = [("bare: full decode", None, BareRun("decode", *b)), (roi, None, BareRun("slice", *b)),
           (res + " (the graph's)", roi, BareRun("resize", *b))]
    out += [(f"+ resize, {name}", roi, BareRun("resize", *b, resize=kw))
            for name, kw in FILTERS.items()]
    out += [(GRAPH, out[2][0], BareRun("train", *b)),
            ("bare: image_random_crop + resize + normalise", None, BareRun("random_crop", *b)),
            ("bare MoCo: full decode, 2 x (slice + resize)", None, BareRun("moco_slice", *b)),
            ("bare MoCo: full decode, 2 x resize of the window as ROI (the graph's)", None,
             BareRun("moco_roi", *b))]
    sweep = [(threads, 2)] + [(t, 2) for t in range(1, 5) if t != threads] + [
        (threads, p) for p in (1, 3, 4)]
    return out + [(f"DaliLoader: {t} thread{'s' * (t > 1)}, prefetch {p}" + (
        " (defaults)" if (t, p) == (threads, 2) else ""), None, LoaderRun(src, batch, t, p))
        for t, p in sweep]


def profile(name, list_path, args) -> list:
    """Time every row in alternating rounds; print and return the Markdown table."""
    from ltrainer.data_pipelines.sources import read_list_file

    src = read_list_file(list_path)
    table = rows(src, args.batch, args.threads)
    for _, _, run in table:   # warm-up pass: thread pools, first allocations
        run.run()
    cpu = {k: [] for k, _, _ in table}
    rate = {k: [] for k, _, _ in table}
    for r in range(args.rounds):
        for k, _, run in table:
            c0, t0 = time.process_time(), time.perf_counter()
            n = run.run()
            rate[k].append(n / (time.perf_counter() - t0))
            cpu[k].append(1e3 * (time.process_time() - c0) / n)
        print(f"{name} round {r + 1}/{args.rounds} done", flush=True)
    best = {k: min(v) for k, v in cpu.items()}
    kb = np.mean([os.path.getsize(src.full_path(i)) for i in range(len(src))]) / 1e3
    lines = [f"{name}: {len(src)} JPEGs ({list_path}, {kb:.0f} KB on average), "
             f"imagenet train recipe at 224 px, batch {args.batch}, {args.threads} DALI "
             f"threads unless a row says otherwise, {args.rounds} alternating rounds; CPU "
             f"ms/img = least of the rounds (median beside it), part = a '+' row's CPU over "
             f"its base's, x graph = over the seeded train graph's", "",
             "| variant | CPU ms/img | median | part | x graph | img/s median |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, base, _ in table:
        part = f"{best[k] - best[base]:.2f}" if base else "-"
        lines.append(f"| {k} | {best[k]:.2f} | {float(np.median(cpu[k])):.2f} | {part} | "
                     f"{best[k] / best[GRAPH]:.2f} | {float(np.median(rate[k])):.0f} |")
    print("\n" + "\n".join(lines) + "\n", flush=True)
    return lines


def main(argv=None) -> int:
    from ltrainer.tools.bench_loaders import make_jpeg_set, make_photo_set

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="photo", help="generated sets, in order: photo, fmnist")
    p.add_argument("--list", help="'relative/path label' list of JPEGs (under its folder) "
                   "instead of --sets")
    p.add_argument("--n", type=int, default=1024, help="images in a generated set")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI threads (default 2, as the "
                   "loader's default); the sweep also runs 1-4 threads")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per row")
    p.add_argument("--work-dir", help="where the generated sets go (default: temp)")
    args = p.parse_args(argv)
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        p.error("DALI is not installed (pip install -e '.[dali]')")

    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="profile_dali_"))
    todo = [("list", args.list)] if args.list else []
    for name in [] if args.list else [s.strip() for s in args.sets.split(",") if s.strip()]:
        if name not in ("photo", "fmnist"):
            p.error(f"--sets: unknown set {name!r}; expected photo, fmnist")
        list_path = os.path.join(work, name, "train.txt")
        if not os.path.exists(list_path):
            print(f"writing the {name} set ({args.n} JPEGs) to {os.path.dirname(list_path)}",
                  flush=True)
            make = make_photo_set if name == "photo" else make_jpeg_set
            make(os.path.dirname(list_path), args.n)
        todo.append((name, list_path))
    for name, list_path in todo:
        if sum(1 for _ in open(list_path)) < args.batch:
            p.error(f"{list_path}: fewer images than one batch ({args.batch})")
        profile(name, list_path, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
