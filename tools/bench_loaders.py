#!/usr/bin/env python3
"""Loader throughput: images/s of every installed backend on the same JPEGs and recipe.

    python tools/bench_loaders.py                      # makes 2,000 256-px JPEGs, all backends
    python tools/bench_loaders.py --list data/train.txt --root data/ --batches 40

Besides torchvision, DALI and FFCV it measures a decode-only ceiling: whole JPEGs decoded by
PIL and by OpenCV (when installed) in as many processes as loader threads, the most a loader
that decodes whole images could reach on these cores (decoding only the crop region, as DALI's
train path does, could pass it; so can reading FFCV's .beton, which skips opening files). Backends are measured in rounds, alternating, and each gets its best round, so load
from other work on the machine hits them alike. Without --list it writes its own JPEG set:
Fashion-MNIST images upscaled to 256 px and tinted so color operations have color to change.
FFCV's .beton of the set is written first (not timed: a one-off conversion).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np
import torch



def make_jpeg_set(out_dir: str, n: int = 2000, size: int = 256, quality: int = 90,
                  seed: int = 0, split: str = "train") -> str:
    """Write ``n`` JPEGs (Fashion-MNIST, upscaled, tinted per image) and their list file."""
    from PIL import Image

    from data_pipelines.sources import read_fashion_mnist

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

    def __init__(self, backend, cfg, dataset, batch, threads):
        from data_pipelines.loaders import make_train_loader
        from data_pipelines.samplers import build_sampler

        self.sampler = build_sampler("uniform", dataset.source.labels, batch_size=batch)
        self.loader = make_train_loader(cfg, dataset, self.sampler, batch_size=batch, seed=0,
                                        in_channels=3, backend=backend)
        self.epoch = 0

    def run(self) -> int:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        n = 0
        for x, y in self.loader:
            n += len(y)
            assert x.dtype == torch.float32 and y.dtype == torch.int64
        return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", help="'relative/path label' list of JPEGs (default: make a set)")
    p.add_argument("--root", help="image root of --list (default: its folder)")
    p.add_argument("--n", type=int, default=2000, help="images in a generated set")
    p.add_argument("--size", type=int, default=256, help="side of generated images")
    p.add_argument("--augment", default="imagenet", choices=("imagenet", "moco", "none"),
                   help="train recipe (default imagenet: RandomResizedCrop + flip + normalize)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="epochs per backend, alternating")
    p.add_argument("--threads", type=int, default=0,
                   help="loader threads/processes per backend (default: all cores)")
    p.add_argument("--backends", default="torchvision,dali,ffcv")
    p.add_argument("--work-dir", help="where the generated set and .beton go (default: temp)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from data_pipelines.augment import DEFAULT_STATS, build_transform
    from data_pipelines.datasets import AugmentedDataset
    from data_pipelines.loaders import backend_status
    from data_pipelines.sources import read_list_file

    threads = args.threads or len(os.sched_getaffinity(0))
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_loaders_")
    list_path = args.list
    if not list_path:
        list_path = os.path.join(work, "train.txt")
        if not os.path.exists(list_path):
            print(f"writing {args.n} JPEGs of {args.size} px (Fashion-MNIST, upscaled) to {work}",
                  flush=True)
            make_jpeg_set(work, args.n, args.size)
    src = read_list_file(list_path, args.root)
    mean, std = DEFAULT_STATS["imagenet"]
    try:
        transform = build_transform(args.augment, True, args.image_size, mean, std, 3)
    except ValueError as exc:  # a recipe the torchvision path does not have (yet)
        print(f"torchvision: {exc}; skipped")
        transform = None
        args.backends = ",".join(b for b in args.backends.split(",") if b != "torchvision")
    dataset = AugmentedDataset(src, transform)
    cfg = {"source": "list", "stats": "imagenet", "augment": args.augment,
           "image_size": args.image_size, "workers": threads, "dali_threads": threads,
           "beton_dir": os.path.join(work, "betons"), "on_bad_image": "fail",
           "dali_device": "auto", "loader": "torchvision"}

    runs = {}
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        ok, why = backend_status(name)
        if not ok:
            print(f"{name}: not installed ({why}); skipped")
            continue
        t0 = time.time()
        runs[name] = LoaderRun(name, cfg, dataset, args.batch, threads)
        runs[name].run()  # warm-up epoch: worker start, FFCV's numba compile, .beton write
        print(f"{name}: ready ({time.time() - t0:.1f} s set-up and warm-up epoch)", flush=True)
    paths = [src.full_path(i) for i in range(len(src))]
    ceilings = ["decode-only PIL"]
    runs["decode-only PIL"] = DecodeCeiling(paths, threads, "PIL")
    try:
        import cv2  # noqa: F401  (installed with FFCV)
        runs["decode-only OpenCV"] = DecodeCeiling(paths, threads, "OpenCV")
        ceilings.append("decode-only OpenCV")
    except ImportError:
        pass

    rates = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            n = run.run()
            rates[name].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    for name in ceilings:
        runs[name].close()

    best = {k: max(v) for k, v in rates.items()}
    base = best.get("torchvision")
    ceiling = max(best[c] for c in ceilings)
    print(f"\n{len(src)} JPEGs ({list_path}), {args.augment} train recipe at {args.image_size} "
          f"px, batch {args.batch}, {threads} loader thread(s)/process(es) per backend, "
          f"{args.rounds} rounds (best / median img/s); decode ceiling = the faster "
          f"decode-only row\n")
    print("| backend | img/s best | img/s median | x torchvision | % of decode ceiling |")
    print("|---|---:|---:|---:|---:|")
    for name, v in rates.items():
        xs = f"{best[name] / base:.2f}x" if base else "-"
        print(f"| {name} | {best[name]:.0f} | {float(np.median(v)):.0f} | {xs} | "
              f"{100 * best[name] / ceiling:.0f}% |")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"rates": rates, "best": best, "threads": threads, "images": len(src),
                       "augment": args.augment, "image_size": args.image_size,
                       "batch": args.batch}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
