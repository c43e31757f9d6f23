"""Parts of tools/gpu_check.py for the items of issue 18 that only a GPU can show: 2
(deterministic mode trains on CUDA), 6 (similarities float32 under bf16 autocast), 8 (no host
synchronisation per training step), 10 (DALI's file reads not on the training thread), 11
(MoCo's exchange volume per step). Items 6 and 11 also run on CPU (CPU autocast and gloo), so
the smoke mode keeps them honest.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ltrainer.trainer.config import load_config
from ltrainer.trainer.engine import Trainer

from .gpu_check_common import (Ctx, Skip, _Sampler, check, feed_synthetic, jpeg_list,
                               list_overrides, release, small_list, speed_check)


def part_deterministic_cuda(ctx: Ctx) -> dict:
    """run.deterministic: true trains on CUDA with both backbone families (their global
    pooling used to raise in backward under torch.use_deterministic_algorithms)."""
    checks, fig = [], {}
    for model in ("resnet8", "resnet50"):
        cfg = load_config(None, list_overrides(ctx, small_list(ctx), ctx.work, **{
            "run.deterministic": True, "model.name": model, "run.name": model,
            "data.batch_size": 16, "data.image_size": 64}))
        try:
            trainer = Trainer(cfg)
            images = torch.randn(16, 3, 64, 64, device=ctx.device).contiguous(
                memory_format=torch.channels_last)
            labels = torch.randint(0, ctx.sizes.classes, (16,), device=ctx.device)
            feed_synthetic(trainer, (images, labels), [3])
            trainer.train_epoch()
            release(trainer)
            err = None
        except Exception as e:  # noqa: BLE001 - reported as the finding
            err = f"{type(e).__name__}: {str(e)[:300]}"
        fig[model] = err or "trained 3 steps"
        checks.append(check(f"{model} trains with deterministic algorithms", err or "ok", "ok",
                            err is None))
    return {"figures": fig, "checks": checks}


def part_float32_under_bf16(ctx: Ctx) -> dict:
    """MoCo's logits, the kNN monitor's scores and CosineHead's cosines under bf16 autocast
    are float32 and equal (to float32 rounding) to the same calls without autocast."""
    from ltrainer.trainer.methods.moco import info_nce_logits
    from ltrainer.trainer.knn import scores as knn_scores
    from ltrainer.trainer.models.heads import CosineHead

    full = not ctx.smoke
    dev, g = ctx.device, torch.Generator().manual_seed(0)
    b, dim, queue = (256, 128, 65536) if full else (8, 16, 64)
    q = F.normalize(torch.randn(b, dim, generator=g), dim=1).to(dev)
    k = F.normalize(q.cpu() + 0.3 * torch.randn(b, dim, generator=g), dim=1).to(dev)
    qu = F.normalize(torch.randn(dim, queue, generator=g), dim=0).to(dev)
    nb, d = (100_000, 2048) if full else (500, 32)
    bank = F.normalize(torch.randn(nb, d, generator=g), dim=1).to(dev)
    labels = torch.randint(0, 10, (nb,), generator=g).to(dev)
    query = F.normalize(bank[:64] + 0.1 * torch.randn(64, d, generator=g).to(dev), dim=1)
    head = CosineHead(d, 10).to(dev)
    feats = torch.randn(64, d, generator=g).to(dev)

    calls = {"moco info_nce_logits": lambda: info_nce_logits(q, k, qu, 0.2),
             "kNN monitor knn_scores": lambda: knn_scores(query, bank, labels, 10, 20, 0.1),
             "CosineHead": lambda: head(feats)}
    checks, fig = [], {}
    with torch.no_grad():
        for name, fn in calls.items():
            ref = fn()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = fn()
            diff = float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            fig[name] = {"dtype": str(out.dtype), "max_rel_diff": diff}
            checks += [check(f"{name}: dtype under bf16 autocast", str(out.dtype),
                             "torch.float32", out.dtype == torch.float32),
                       check(f"{name}: relative difference to float32", diff, "<= 1e-5",
                             diff <= 1e-5)]
    return {"figures": fig, "checks": checks}


class _StepSyncs:
    """Batches for the engine that note how many host syncs the debug mode reported so far,
    at the start of each step; the differences are the syncs of each step."""

    def __init__(self, batch, caught):
        self.batch, self.caught, self.marks = batch, caught, []

    def loader(self, n):
        for _ in range(n):
            self.marks.append(len(self.caught))
            yield self.batch


def _count_syncs(trainer, batch, steps: int) -> dict:
    trainer.data.train_loader = lambda *a, **k: (iter([batch] * 2), _Sampler(2))
    trainer.train_epoch()                                   # warm-up: cudnn, allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = _StepSyncs(batch, caught)
        trainer.data.train_loader = lambda *a, **k: (probe.loader(steps), _Sampler(steps))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        marks = probe.marks + [len(caught)]
        where = sorted({f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                        if "synchroniz" in str(w.message)})
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    return {"syncs_per_step": per_step, "where": where[:12]}


def part_host_sync(ctx: Ctx) -> dict:
    """torch.cuda.set_sync_debug_mode('warn') around engine steps (CE) and MoCo steps: a
    step that is not a logging step must not wait for the GPU. One process: collectives are
    no-ops here, so their syncs show only on a multi-GPU machine."""
    if not ctx.cuda:
        raise Skip("needs CUDA (set_sync_debug_mode watches CUDA streams)")
    fig, checks = {}, []
    for method in ("supervised", "moco"):
        extra = {"method.name": method, "run.name": method, "data.batch_size": 64,
                 "data.image_size": 96, "model.name": "resnet18"}
        if method == "moco":
            extra.update({"data.augment": "moco", "moco.queue": 4096})
        cfg = load_config(None, list_overrides(ctx, small_list(ctx), ctx.work, **extra))
        trainer = Trainer(cfg)
        views = 2 if method == "moco" else 1
        s = ctx.sizes
        shape = (64, views, 3, 96, 96) if views > 1 else (64, 3, 96, 96)
        images = torch.randn(shape, device=ctx.device)
        if views == 1:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = (images, torch.randint(0, s.classes, (64,), device=ctx.device))
        r = _count_syncs(trainer, batch, 6)
        release(trainer)
        fig[method] = r
        quiet = r["syncs_per_step"][:-1]          # the last step logs (float() of the loss)
        checks.append(check(f"{method}: host syncs in non-logging steps", quiet, "all 0",
                            not any(quiet)))
    return {"figures": fig, "checks": checks}


def part_dali_slow_read(ctx: Ctx) -> dict:
    """Each file read made slow (a sleep per file): if DALI's reads overlap (a parallel
    external source), a batch takes well under batch x the delay; read one by one on the
    training thread, it takes at least that."""
    from ltrainer.data_pipelines.loaders import backend_status

    ok, why = backend_status("dali")
    if not ok:
        raise Skip(f"dali is not installed here ({why})")
    delay = 0.004 if ctx.smoke else 0.01
    s = ctx.sizes
    lst = small_list(ctx) if ctx.smoke else jpeg_list(ctx, s.jpegs, s.jpeg_wh, s.classes)
    cfg = load_config(None, list_overrides(ctx, lst, ctx.work, **{
        "data.loader": "dali", "data.dali_threads": max(1, s.workers), "run.name": "dali"}))
    trainer = Trainer(cfg)
    calls = mp.get_context("fork").Value("i", 0)
    real = np.fromfile

    def slow_fromfile(*a, **k):
        with calls.get_lock():
            calls.value += 1
        time.sleep(delay)
        return real(*a, **k)

    def per_batch(epoch, batches):
        loader = trainer.data.train_loader("uniform", epoch)[0]
        it = iter(loader)
        next(it)                                   # start-up and the first batch
        n = 0
        t0 = time.perf_counter()
        for _ in range(batches):
            try:
                next(it)
            except StopIteration:
                break
            n += 1
        return (time.perf_counter() - t0) / max(1, n)

    batches = 7 if ctx.smoke else 15
    normal = per_batch(0, batches)
    np.fromfile = slow_fromfile
    try:
        slow = per_batch(1, batches)
    finally:
        np.fromfile = real
    release(trainer)
    serial = s.batch * delay
    fig = {"delay_per_file_ms": delay * 1e3, "batch": s.batch, "normal_s_per_batch": round(normal, 4),
           "slow_s_per_batch": round(slow, 4), "serial_reads_s_per_batch": serial,
           "patched_reads_seen_here": calls.value}
    if calls.value == 0 and slow < serial:
        raise RuntimeError("the slow read was never called: DALI no longer reads files with "
                           "numpy.fromfile; update this part's injection")
    return {"figures": fig, "checks": [
        speed_check(ctx, "batch time with slow reads / serial reading time",
                    round(slow / serial, 3), "<= 0.5 (reads overlap)", slow / serial <= 0.5)]}


def _exchange_worker(rank, world, port, ctx, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    received = {}

    def count(name, nbytes):
        received[name] = received.get(name, 0) + int(nbytes)

    def nbytes(t):
        return t.numel() * t.element_size()

    orig = {n: getattr(dist, n) for n in ("all_gather", "all_gather_into_tensor", "all_to_all",
                                          "all_to_all_single", "broadcast", "all_reduce")}

    def wrap(name):
        def f(*a, **k):
            r = orig[name](*a, **k)
            if name == "all_gather":
                count(name, sum(nbytes(t) for t in a[0]) - nbytes(a[1]))
            elif name == "all_gather_into_tensor":
                count(name, nbytes(a[0]) - nbytes(a[1]))
            elif name == "all_to_all":
                count(name, sum(nbytes(t) for i, t in enumerate(a[0]) if i != rank))
            elif name == "all_to_all_single":
                count(name, nbytes(a[0]) * (world - 1) // world)
            elif name == "broadcast":
                count(name, 0 if k.get("src", a[1] if len(a) > 1 else 0) == rank else nbytes(a[0]))
            else:
                count(name, nbytes(a[0]))
            return r
        return f

    b, size = 8 * world, 32
    cfg = load_config(None, list_overrides(ctx, small_list(ctx), os.path.join(ctx.work, "x"), **{
        "method.name": "moco", "data.augment": "moco", "moco.queue": 64 * world,
        "model.name": "resnet8", "data.batch_size": b, "data.image_size": size,
        "engine.device": "cpu", "engine.amp": "bf16", "dist.backend": "gloo"}))
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(rank)
    batch = (torch.randn(b // world, 2, 3, size, size, generator=g),
             torch.zeros(b // world, dtype=torch.long))
    feed_synthetic(trainer, batch, [1])
    trainer.train_epoch()                                  # DDP's first step broadcasts
    for n in orig:
        setattr(dist, n, wrap(n))
    steps = 2
    feed_synthetic(trainer, batch, [steps])
    trainer.train_epoch()
    for n, f in orig.items():
        setattr(dist, n, f)
    release(trainer)
    if rank == 0:
        local_images = (b // world) * 3 * size * size * torch.tensor([], dtype=torch.bfloat16).element_size()
        with open(out, "w") as fh:
            json.dump({"world": world, "local_batch": b // world, "image_px": size,
                       "received_bytes_per_step": {k: v // steps for k, v in received.items()},
                       "local_batch_bytes_bf16": local_images}, fh)
    dist.destroy_process_group()


def part_moco_exchange(ctx: Ctx) -> dict:
    """Bytes each rank receives per MoCo step through torch.distributed (2 gloo processes
    on CPU, bf16 autocast): sharing the shuffle and swapping only each rank's images needs
    at most one local batch in the training dtype; gathering every image in float32 takes
    (W - 1) x 2 times that."""
    from ltrainer.trainer.distributed import free_port

    world, out = 2, os.path.join(ctx.work, "exchange.json")
    # fork is quick, but not from a process that has started CUDA (it has on a GPU machine)
    c = mp.get_context("spawn" if ctx.cuda else "fork")
    port = free_port()
    procs = [c.Process(target=_exchange_worker, args=(r, world, port, ctx, out))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    if any(codes) or not os.path.exists(out):
        raise RuntimeError(f"exchange workers exited {codes}")
    with open(out) as f:
        r = json.load(f)
    total = sum(r["received_bytes_per_step"].values())
    limit = r["local_batch_bytes_bf16"]
    r["received_total_per_step"] = total
    return {"figures": r, "checks": [
        check("bytes received per rank per step / one local batch in bf16",
              round(total / limit, 3), "<= 1.0", total <= limit)]}
