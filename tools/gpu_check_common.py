"""What the parts of tools/gpu_check.py share: problem sizes (full and smoke), the context a
part gets, checks, timing on the device, generated photo-like JPEGs, a config over them, and
a way to feed the engine one pre-made device batch (so its own cost can be compared with a
bare loop's). A part is `part_NAME(ctx) -> dict` with "figures" (numbers to report) and
"checks" (each a name, the measured value, the target and whether it holds; ok=None =
reported, not judged: speed targets in smoke mode); it raises Skip(reason) when it cannot run
here. Parts run in their own process (see gpu_check.py), so a crash, a hang or the memory of
one part cannot touch another.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ltrainer.trainer.engine import Trainer  # noqa: E402


class Skip(Exception):
    """The part cannot run here (no GPU, a package missing); the message says why."""


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the full check on a GPU, or tiny ones for the CPU smoke mode."""
    model: str
    image: int
    batch: int
    steps: int           # timed steps per measurement
    warmup: int
    rounds: int          # alternating engine / bare-loop rounds, best of each
    classes: int
    jpegs: int           # generated photo-like JPEGs for the end-to-end parts
    jpeg_wh: tuple
    workers: int
    moco_queue: int
    bank: tuple          # (rows, dim) of the kNN bank
    queries: int
    fm_epochs: int


FULL = Sizes("resnet50", 224, 256, 30, 8, 2, 1000, 4096, (500, 375), 14, 65536,
             (437_513, 2048), 256, 2)
SMOKE = Sizes("resnet8", 16, 4, 2, 1, 1, 10, 16, (100, 75), 0, 64, (4000, 64), 16, 1)


@dataclass
class Ctx:
    smoke: bool
    device: torch.device
    work: str            # this part's scratch folder
    shared: str          # scratch shared by the parts of one run (generated JPEGs)
    sizes: Sizes
    fmnist_root: str | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def note(self, msg: str):
        print(f"    {msg}", flush=True)


def release(trainer: Trainer):
    """Close a Trainer that was driven step by step (not through fit()): its log and its
    run-folder lock, so another Trainer can open the same folder (resume)."""
    trainer.log.close()
    folder = getattr(trainer, "folder", None)
    if folder is not None:
        folder.close()


def check(name: str, value, target: str, ok) -> dict:
    return {"name": name, "value": value, "target": target,
            "ok": None if ok is None else bool(ok)}


def speed_check(ctx, name, value, target, ok) -> dict:
    """A speed target: judged on a GPU only (smoke sizes on CPU say nothing about speed)."""
    return check(name, value, target, None if ctx.smoke or not ctx.cuda else ok)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)


# --------------------------------------------------------------------------- data

def photo_like_jpeg(path: str, seed: int, wh: tuple, quality: int = 90):
    """A JPEG that compresses like a photo (~100 KB at 500x375): smooth colour fields, shapes
    with edges, a light blur, then grain; pure noise or flat colour would not."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = wh
    low = Image.fromarray((rng.random((3, 4, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    mid = Image.fromarray((rng.random((h // 25 + 1, w // 25 + 1, 3)) * 255).astype(np.uint8))
    img = 0.6 * np.asarray(low, np.float32) + 0.4 * np.asarray(mid.resize((w, h), Image.BICUBIC),
                                                               np.float32)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, max(11, w // 2))),
               y0 + int(rng.integers(10, max(11, h // 2)))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(pil.filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    arr = arr + rng.normal(0, 20, arr.shape).astype(np.float32)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)


def _write_some(args):
    folder, wh, seeds = args
    for s in seeds:
        photo_like_jpeg(os.path.join(folder, f"img_{s:06d}.jpg"), s, wh)


def jpeg_list(ctx: Ctx, n: int, wh: tuple, classes: int) -> str:
    """A 'path label' list of n generated JPEGs (made once per run, shared by the parts)."""
    folder = os.path.join(ctx.shared, f"jpegs_{n}_{wh[0]}x{wh[1]}")
    list_path = os.path.join(folder, "list.txt")
    if os.path.exists(list_path):
        return list_path
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    procs = max(1, min(16, (os.cpu_count() or 1)))
    chunks = [(folder, wh, list(range(i, n, procs))) for i in range(procs)]
    if procs > 1 and n >= 64:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_write_some, chunks)
    else:
        for c in chunks:
            _write_some(c)
    with open(list_path + ".tmp", "w") as f:
        f.writelines(f"img_{i:06d}.jpg {i % classes}\n" for i in range(n))
    os.replace(list_path + ".tmp", list_path)
    size = np.mean([os.path.getsize(os.path.join(folder, f"img_{i:06d}.jpg"))
                    for i in range(min(n, 200))])
    ctx.note(f"wrote {n} JPEGs {wh[0]}x{wh[1]} (mean {size / 1e3:.0f} KB) in "
             f"{time.perf_counter() - t0:.1f} s")
    return list_path


def list_overrides(ctx: Ctx, list_path: str, run_dir: str, **extra) -> list[str]:
    """A config over a generated JPEG list (train and test), the ImageNet recipe, this device."""
    s = ctx.sizes
    over = {"run.out_dir": run_dir, "run.name": "run", "data.source": "list",
            "data.root": os.path.dirname(list_path),
            "data.train_list": list_path, "data.val_list": list_path, "data.test_list": list_path,
            "data.num_classes": s.classes, "data.imbalance": "none", "data.stats": "imagenet",
            "data.augment": "imagenet", "data.image_size": s.image, "data.batch_size": s.batch,
            "data.eval_batch_size": s.batch, "data.workers": s.workers,
            "model.name": s.model, "model.channels_last": True,
            "optim.lr": 0.1, "optim.weight_decay": 1e-4, "sched.name": "constant",
            "sched.warmup_epochs": 0, "sched.epochs": 1000, "eval.every_epochs": 0,
            "engine.device": ctx.device.type, "engine.progress": "none",
            "engine.log_every": 1_000_000, "engine.amp": "bf16"}
    over.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}"
            for k, v in over.items()]


def small_list(ctx: Ctx) -> str:
    """A few small JPEGs: enough for a Trainer whose batches come from elsewhere."""
    return jpeg_list(ctx, 32, (64, 48), ctx.sizes.classes)


class _Sampler:
    def __init__(self, n):
        self.num_batches = n

    def set_epoch(self, epoch, start_batch=0):
        pass


def feed_synthetic(trainer: Trainer, batch, steps: list):
    """Make the engine train on one pre-made device batch, `steps[0]` steps per epoch (mutable,
    so warm-up and timed epochs can differ), with no data loading at all: what remains is the
    engine's own cost, to compare against a bare loop on the same batch."""
    def loader(*_a, **_k):
        n = steps[0]
        return (batch for _ in range(n)), _Sampler(n)

    trainer.data.train_loader = loader


def synthetic_batch(ctx: Ctx, views: int = 1):
    s, g = ctx.sizes, torch.Generator().manual_seed(0)
    shape = (s.batch, views, 3, s.image, s.image) if views > 1 else (s.batch, 3, s.image, s.image)
    images = torch.randn(shape, generator=g).to(ctx.device)
    if views == 1:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, s.classes, (s.batch,), generator=g).to(ctx.device)
    return images, labels


def timed(device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def engine_rate(trainer: Trainer, steps: list, n: int) -> float:
    steps[0] = n
    sec = timed(trainer.device, trainer.train_epoch)
    return n * trainer.cfg.data.batch_size / sec


def bare_loop(model, images, labels, amp: str, device, compile_: bool):
    """The loop a user would write: autocast, GradScaler for fp16, fused SGD, nothing else."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          fused=True if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    fwd = torch.compile(model) if compile_ else model
    model.train()

    def run(n):
        for _ in range(n):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(fwd(images), labels)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    return run
