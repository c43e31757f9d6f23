#!/usr/bin/env python3
"""Loader throughput: images/s of every installed backend on the same JPEGs and recipe.

    python tools/bench_loaders.py                      # photo-like + Fashion-MNIST sets
    python tools/bench_loaders.py --sets photo --rounds 3 --work-dir /tmp/bench
    python tools/bench_loaders.py --list data/train.txt --root data/

Sets it writes itself (--sets, both by default, one table each):
- photo: JPEGs shaped like ImageNet's (500x375, 375x500 or 500x333 photo collages with a
  little noise, quality 92-97, ~100 KB each: tools/make_synthetic_lt.py --size imagenet),
  the real workload's decoding cost;
- fmnist: Fashion-MNIST upscaled to 256 px and tinted (small, smooth files: mostly the cost
  of opening them).

Rows: the torchvision, DALI and FFCV backends as data_pipelines builds them, each with
--threads loader threads or worker processes (the torchvision row gets that many workers:
loaders.py would give a training process one core fewer), and 'torchvision @<rev>': the
torchvision path of an older commit (default 76e2852, the code before decode.py), run from a
`git archive` of that commit in a child process, so old and new are timed in the same run.
The ceiling rows decode whole JPEGs once (libjpeg-turbo through PIL and OpenCV) in as many
processes as loader threads: the most a loader that decodes whole images could deliver; a
loader decoding only the crop (or reading a re-encoded .beton) can pass it. Backends run in
alternating rounds and each keeps its best round, so load from other work hits them alike.
FFCV gets one row per --beton setting (default: raw pixels, and JPEG at quality 90, the
writer's default for files); each .beton is written first (not timed: a one-off conversion).
Besides img/s, each row gives its CPU time per image (all its processes and threads), which
load from other work inflates much less than it does the wall clock.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE_REV = "76e2852"


def make_jpeg_set(out_dir: str, n: int = 2000, size: int = 256, quality: int = 90,
                  seed: int = 0, split: str = "train") -> str:
    """Write ``n`` JPEGs (Fashion-MNIST, upscaled, tinted per image) and their list file."""
    from PIL import Image

    from ltrainer.data_pipelines.sources import read_fashion_mnist

    src = read_fashion_mnist(train=split == "train")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(src), size=min(n, len(src)), replace=False)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    lines = []
    for k, i in enumerate(pick.tolist()):
        gray = Image.fromarray(src.images[i]).resize((size, size), Image.BILINEAR)
        g = np.asarray(gray, dtype=np.float32)[:, :, None]
        tint = rng.uniform(0.4, 1.0, size=3).astype(np.float32)
        img = np.clip(g * tint + rng.uniform(0, 40, size=3), 0, 255).astype(np.uint8)
        rel = f"images/{k:05d}.jpg"
        Image.fromarray(img).save(os.path.join(out_dir, rel), quality=quality)
        lines.append(f"{rel} {int(src.labels[i])}\n")
    list_path = os.path.join(out_dir, f"{split}.txt")
    with open(list_path, "w") as f:
        f.writelines(lines)
    return list_path


def make_photo_set(out_dir: str, n: int = 2000, classes: int = 10, seed: int = 0,
                   jobs: int = 1) -> str:
    """Write ``n`` ImageNet-shaped photo-like JPEGs (make_synthetic_lt's imagenet images, at
    ImageNet-style paths) and their list file."""
    from ltrainer.tools.make_synthetic_lt import write_images

    items = [(f"train/c{k % classes:03d}/c{k % classes:03d}_{k}.JPEG", k % classes)
             for k in range(n)]
    write_images(out_dir, items, "imagenet", "imagenet", seed, jobs)
    list_path = os.path.join(out_dir, "train.txt")
    with open(list_path, "w") as f:
        f.writelines(f"{p} {label}\n" for p, label in items)
    return list_path


def _decode_pil(paths) -> int:
    from PIL import Image

    for p in paths:
        with Image.open(p) as im:
            im.load()      # the decode alone: no conversion or copy
    return len(paths)


def _decode_cv2(paths) -> int:
    import cv2

    cv2.setNumThreads(1)
    for p in paths:
        if cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_COLOR) is None:
            raise ValueError(f"{p}: OpenCV cannot decode it")
    return len(paths)


class DecodeCeiling:
    """Whole-JPEG decodes of the same files (read from disk) in ``procs`` processes: the most
    a loader that decodes whole images could deliver on these cores, before any resizing,
    normalization, batching or copying. ``how`` is PIL or OpenCV (both libjpeg-turbo)."""

    def __init__(self, paths, procs: int, how: str):
        self.fn = {"PIL": _decode_pil, "OpenCV": _decode_cv2}[how]
        self.pool = mp.get_context("fork").Pool(procs)
        self.chunks = [paths[i:i + 32] for i in range(0, len(paths), 32)]
        self.pool.map(self.fn, self.chunks[:procs])  # start and warm the processes

    def run(self) -> int:
        return sum(self.pool.map(self.fn, self.chunks, chunksize=1))

    def close(self):
        self.pool.terminate()


class LoaderRun:
    """One backend's training loader over the set, one epoch per round."""

    def __init__(self, backend, cfg, dataset, batch, threads, window=True, reuse=True):
        from ltrainer.data_pipelines import decode
        from ltrainer.data_pipelines.loaders import augment_spec, make_train_loader
        from ltrainer.data_pipelines.samplers import build_sampler
        from ltrainer.data_pipelines.torchvision_loader import build_torchvision_loader

        self.sampler = build_sampler("uniform", dataset.source.labels, batch_size=batch)
        if backend == "torchvision":   # `threads` workers, as the other backends get
            self.loader = build_torchvision_loader(dataset, self.sampler, batch, threads, 0,
                                                   spec=augment_spec(cfg, True, 3),
                                                   reuse_batches=reuse)
        else:
            self.loader = make_train_loader(cfg, dataset, self.sampler, batch_size=batch,
                                            seed=0, in_channels=3, backend=backend)
        self.epoch = 0
        kept = decode._WINDOW[:]
        if not window:                 # --ablate: the workers fork without jpeg_window
            decode._WINDOW[:] = [None]
        try:
            self.run()                 # warm-up epoch: worker start, FFCV's numba compile
        finally:
            decode._WINDOW[:] = kept

    def run(self) -> int:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        n = 0
        for x, y in self.loader:
            n += len(y)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
        return n

    def close(self):
        """Stop its workers now, not when the garbage collector reaches it in a later set."""
        import gc

        self.loader = None
        gc.collect()


_CHILD = r"""
import os, sys, time
tree, list_path, root, augment, size, batch, threads = sys.argv[1:8]   # PYTHONPATH=tree
from tools.bench_loaders import LoaderRun
from ltrainer.data_pipelines.augment import DEFAULT_STATS, build_transform
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.sources import read_list_file
src = read_list_file(list_path, root or None)
mean, std = DEFAULT_STATS["imagenet"]
ds = AugmentedDataset(src, build_transform(augment, True, int(size), mean, std, 3))
cfg = {"source": "list", "stats": "imagenet", "augment": augment, "image_size": int(size),
       "workers": int(threads), "on_bad_image": "fail", "loader": "torchvision"}
run = LoaderRun("torchvision", cfg, ds, int(batch), int(threads))
run.run()
print("ready", flush=True)
for line in sys.stdin:
    print(run.run(), flush=True)
"""


class OldTreeRun:
    """The torchvision loader of an older commit, as that commit's bench_loaders built it,
    in a child process started from a `git archive` of the commit (same interpreter)."""

    def __init__(self, tree, list_path, root, augment, size, batch, threads):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, tree, list_path, root or "", augment, str(size),
             str(batch), str(threads)], cwd=tree, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": tree})
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the loader of {tree} did not start")

    def run(self) -> int:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self):
        self.proc.terminate()     # its persistent DataLoader workers go with it
        self.proc.wait(timeout=60)


def old_tree(rev: str, work: str) -> str | None:
    """A `git archive` of ``rev`` under ``work`` (made once), or None without git."""
    dest = os.path.join(work, f"tree-{rev}")
    if os.path.isdir(os.path.join(dest, "data_pipelines")):
        return dest
    os.makedirs(dest, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"torchvision @{rev}: no git archive of it ({exc}); row skipped")
        return None
    return dest


def parse_beton(text: str) -> dict:
    """'mode=jpg,quality=90,max_side=0' -> write_beton keyword arguments."""
    out = {"mode": "jpg", "jpeg_quality": 90, "max_side": None}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "mode":
            out["mode"] = value
        elif key == "quality":
            out["jpeg_quality"] = int(value)
        elif key == "max_side":
            out["max_side"] = int(value) or None
        else:
            raise SystemExit(f"--beton {text!r}: unknown setting {key!r}; expected mode, "
                             f"quality, max_side")
    return out


def bench_set(name, list_path, root, args, threads, work) -> dict:
    """Time every backend on one set; print and return its table."""
    from ltrainer.data_pipelines.augment import DEFAULT_STATS, build_transform
    from ltrainer.data_pipelines.datasets import AugmentedDataset
    from ltrainer.data_pipelines.loaders import backend_status
    from ltrainer.data_pipelines.sources import read_list_file

    src = read_list_file(list_path, root)
    mean, std = DEFAULT_STATS["imagenet"]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        transform = build_transform(args.augment, True, args.image_size, mean, std, 3)
    except ValueError as exc:  # a recipe the torchvision path does not have (yet)
        print(f"torchvision: {exc}; skipped")
        transform, backends = None, [b for b in backends if b != "torchvision"]
    dataset = AugmentedDataset(src, transform)
    cfg = {"source": "list", "stats": "imagenet", "augment": args.augment,
           "image_size": args.image_size, "workers": threads, "dali_threads": threads,
           "on_bad_image": "fail", "dali_device": "auto", "loader": "torchvision"}

    runs = {}
    if args.baseline_rev and "torchvision" in backends:
        tree = old_tree(args.baseline_rev, work)
        if tree:
            t0 = time.time()
            runs[f"torchvision @{args.baseline_rev}"] = OldTreeRun(
                tree, os.path.abspath(list_path), root and os.path.abspath(root), args.augment,
                args.image_size, args.batch, threads)
            print(f"torchvision @{args.baseline_rev}: ready ({time.time() - t0:.1f} s)",
                  flush=True)
    for backend in backends:
        ok, why = backend_status(backend)
        if not ok:
            print(f"{backend}: not installed ({why}); skipped")
            continue
        variants = [(backend, cfg)]
        if backend == "ffcv":   # one row per .beton setting, each in its own folder
            from ltrainer.data_pipelines.ffcv_loader import ensure_beton

            variants = []
            for text in args.beton.split(";"):
                beton = parse_beton(text)
                tag = (f"{beton['mode']}" + (f" q{beton['jpeg_quality']}" if beton["mode"]
                                             != "raw" else "")
                       + (f" max {beton['max_side']}" if beton["max_side"] else ""))
                folder = os.path.join(work, f"betons-{name}-{tag.replace(' ', '-')}")
                t0 = time.time()
                ensure_beton(src, folder, **beton)
                mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                         if f.endswith(".beton")) / 2 ** 20
                print(f"ffcv [{tag}]: .beton {mb:.0f} MiB ({time.time() - t0:.0f} s)")
                variants.append((f"ffcv [{tag}]", {**cfg, "beton_dir": folder}))
        if backend == "torchvision" and args.ablate:
            variants = [(backend, cfg, {}), (f"{backend}, whole-file decode", cfg,
                                             {"window": False}),
                        (f"{backend}, fresh batch memory", cfg, {"reuse": False})]
        for row, row_cfg, *options in variants:
            t0 = time.time()
            runs[row] = LoaderRun(backend, row_cfg, dataset, args.batch, threads,
                                  **(options[0] if options else {}))
            print(f"{row}: ready ({time.time() - t0:.1f} s set-up and warm-up epoch)",
                  flush=True)
    paths = [src.full_path(i) for i in range(len(src))]
    ceilings = ["decode-only PIL"]
    runs["decode-only PIL"] = DecodeCeiling(paths, threads, "PIL")
    try:
        import cv2  # noqa: F401  (installed with FFCV)
        runs["decode-only OpenCV"] = DecodeCeiling(paths, threads, "OpenCV")
        ceilings.append("decode-only OpenCV")
    except ImportError:
        pass

    rates = {k: [] for k in runs}
    cpu_ms = {k: [] for k in runs}
    try:
        for r in range(args.rounds):
            for k, run in runs.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                n = run.run()
                rates[k].append(n / (time.perf_counter() - t0))
                cpu_ms[k].append(1e3 * (cpu_seconds() - c0) / n)
            print(f"{name} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    finally:
        for run in runs.values():
            run.close()

    from ltrainer.data_pipelines.decode import decoder_name

    best = {k: max(v) for k, v in rates.items()}
    base = best.get(f"torchvision @{args.baseline_rev}") or best.get("torchvision")
    ceiling = max(best[c] for c in ceilings)
    kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
    lines = [f"{name}: {len(src)} JPEGs ({list_path}, {kb:.0f} KB on average), {args.augment} "
             f"train recipe at {args.image_size} px, batch {args.batch}, {threads} loader "
             f"thread(s)/process(es) each, best / median of {args.rounds} rounds (img/s); "
             f"x = over the baseline row, ceiling = the faster decode-only row; "
             f"torchvision's train crops: {decoder_name()}", "",
             f"| backend | img/s best | img/s median | x {base and 'baseline'} | "
             f"of the decode ceiling | CPU ms/img |", "|---|---:|---:|---:|---:|---:|"]
    for k, v in rates.items():
        xs = f"{best[k] / base:.2f}x" if base else "-"
        lines.append(f"| {k} | {best[k]:.0f} | {float(np.median(v)):.0f} | {xs} | "
                     f"{100 * best[k] / ceiling:.0f}% | {min(cpu_ms[k]):.2f} |")
    print("\n" + "\n".join(lines) + "\n", flush=True)
    return {"set": name, "list": list_path, "images": len(src), "kb": kb, "rates": rates,
            "best": best, "cpu_ms": cpu_ms, "table": lines}


def cpu_seconds() -> float:
    """CPU time of this process and all its children (DataLoader workers, the ceiling's
    pool, the baseline's process): a loaded machine stretches img/s, much less this."""
    try:
        import psutil
    except ImportError:   # this process and its finished children only
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    me = psutil.Process()
    # user, system and those of its reaped children: a worker that exits mid-round (another
    # row's loader shut down) moves its time into its parent's children_* fields, not away
    total = sum(me.cpu_times()[:4])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:4])
        except psutil.NoSuchProcess:
            pass
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", help="'relative/path label' list of JPEGs (default: make --sets)")
    p.add_argument("--root", help="image root of --list (default: its folder)")
    p.add_argument("--sets", default="photo,fmnist",
                   help="generated sets to time, in order: photo, fmnist (default both)")
    p.add_argument("--n", type=int, default=2000, help="images in a generated set")
    p.add_argument("--size", type=int, default=256, help="side of the fmnist set's images")
    p.add_argument("--augment", default="imagenet", choices=("imagenet", "moco", "none"),
                   help="train recipe (default imagenet: RandomResizedCrop + flip + normalize)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="epochs per backend, alternating")
    p.add_argument("--threads", type=int, default=0,
                   help="loader threads/processes per backend (default: all cores)")
    p.add_argument("--backends", default="torchvision,dali,ffcv")
    p.add_argument("--baseline-rev", default=BASELINE_REV,
                   help=f"commit whose torchvision loader is the baseline row (default "
                        f"{BASELINE_REV}; '' = none)")
    p.add_argument("--beton", default="mode=raw;mode=jpg,quality=90",
                   help="FFCV .beton settings, one row each, ';'-separated: "
                        "mode=raw|jpg|smart, quality=1-100, max_side=N (0 = keep)")
    p.add_argument("--work-dir", help="where the generated sets and .betons go (default: temp)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--ablate", action="store_true",
                   help="torchvision also without its window decoder, and without reused "
                        "batch memory (one row each)")
    args = p.parse_args(argv)

    threads = args.threads or len(os.sched_getaffinity(0))
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="bench_loaders_"))
    if args.list:
        todo = [("list", args.list, args.root)]
    else:
        todo = []
        for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
            folder = os.path.join(work, name)
            list_path = os.path.join(folder, "train.txt")
            if name not in ("photo", "fmnist"):
                p.error(f"--sets: unknown set {name!r}; expected photo, fmnist")
            if not os.path.exists(list_path):
                print(f"writing the {name} set ({args.n} JPEGs) to {folder}", flush=True)
                if name == "photo":
                    make_photo_set(folder, args.n, jobs=threads)
                else:
                    make_jpeg_set(folder, args.n, args.size)
            todo.append((name, list_path, None))
    results = [bench_set(name, list_path, root, args, threads, work)
               for name, list_path, root in todo]
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"sets": results, "threads": threads, "augment": args.augment,
                       "image_size": args.image_size, "batch": args.batch,
                       "beton": args.beton, "baseline_rev": args.baseline_rev}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
