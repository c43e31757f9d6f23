"""The parts of tools/gpu_check.py that issue 15 lists (see gpu_check_common.py for what a
part is). Everything goes through the project's public entry points: load_config, Trainer
and train, the method and loss registries, the loaders and feature_bank.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ltrainer.trainer.config import load_config
from ltrainer.trainer.engine import Trainer

from .gpu_check_common import (ROOT, Ctx, Skip, bare_loop, check, engine_rate, feed_synthetic,
                               jpeg_list, list_overrides, peak_gib, release, reset_peak,
                               small_list, speed_check, synthetic_batch, timed)


def part_environment(ctx: Ctx) -> dict:
    """Versions (Python, torch, CUDA, cuDNN, NCCL, torchvision, DALI, FFCV, faiss), the GPU's
    name, memory and compute capability; on a GPU run, that CUDA is visible at all."""
    import platform

    fig = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "cuda_available": torch.cuda.is_available()}
    import torchvision
    fig["torchvision"] = torchvision.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        fig.update(gpus=torch.cuda.device_count(), gpu=p.name,
                   gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version(),
                   nccl=str(torch.cuda.nccl.version()),
                   bf16_supported=torch.cuda.is_bf16_supported())
    for name, dist_name in (("dali", "nvidia-dali-cuda130"), ("ffcv", "ffcv"),
                            ("faiss", None)):
        fig[name] = _package_version(name, dist_name, import_it=not ctx.smoke)
    if not ctx.smoke and not fig["faiss"].startswith("missing"):
        import faiss
        fig["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    checks = [check("torch imports and reports its version", fig["torch"], "any", True)]
    if not ctx.smoke:
        checks.append(check("CUDA device visible", fig["cuda_available"], "True",
                            fig["cuda_available"]))
    return {"figures": fig, "checks": checks}


def _package_version(name: str, dist_name: str | None, import_it: bool) -> str:
    """The installed version; with import_it, also whether it imports (DALI and FFCV load
    shared libraries at import). Smoke mode reads metadata only: the imports take seconds."""
    from importlib import metadata

    if import_it:
        if name in ("dali", "ffcv"):
            from ltrainer.data_pipelines.loaders import backend_status
            ok, why = backend_status(name)
        else:
            try:
                __import__(name)
                ok, why = True, ""
            except ImportError as e:
                ok, why = False, str(e)
        if not ok:
            return f"missing ({why})"
    names = [dist_name] if dist_name else ["faiss-gpu", "faiss-cpu", "faiss-gpu-cu12"]
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return "installed (version unknown)" if import_it else "missing (no package metadata)"


def part_nccl(ctx: Ctx) -> dict:
    """torchrun, one process per visible GPU (2 gloo processes in smoke mode), through the
    engine's own process-group set-up; all_reduce and all_gather_cat checked, bus bandwidth."""
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    nproc = max(1, gpus) if ctx.cuda else 2
    out = os.path.join(ctx.work, "nccl.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "tools", "gpu_check_worker.py"),
           out, "cuda" if ctx.cuda else "cpu"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr[-1500:]}")
    with open(out) as f:
        r = json.load(f)
    r["processes"] = nproc
    return {"figures": r, "checks": [
        check("all_reduce of rank+1 equals the sum", r["all_reduce"], f"{r['expected']}",
              r["all_reduce"] == r["expected"]),
        check("all_gather_cat holds every rank's rows in rank order", r["gather_ok"], "True",
              r["gather_ok"])]}


def _throughput(ctx: Ctx, amp: str, compile_: bool) -> dict:
    s = ctx.sizes
    cfg = load_config(None, list_overrides(ctx, small_list(ctx), ctx.work, **{
        "engine.amp": amp, "model.compile": compile_, "run.name": f"{amp}_{compile_}"}))
    trainer = Trainer(cfg)
    images, labels = synthetic_batch(ctx)
    steps = [s.warmup]
    feed_synthetic(trainer, (images, labels), steps)
    bare_model = trainer.method.build_model().to(ctx.device, memory_format=torch.channels_last)
    bare = bare_loop(bare_model, images, labels, amp, ctx.device, compile_)
    reset_peak(ctx.device)
    timed(ctx.device, lambda: bare(s.warmup))
    bare_peak = peak_gib(ctx.device)
    reset_peak(ctx.device)
    engine_rate(trainer, steps, s.warmup)
    engine_peak = peak_gib(ctx.device)
    rates = {"bare": [], "engine": []}
    for _ in range(s.rounds):
        rates["bare"].append(s.steps * s.batch / timed(ctx.device, lambda: bare(s.steps)))
        rates["engine"].append(engine_rate(trainer, steps, s.steps))
    release(trainer)
    best = {k: max(v) for k, v in rates.items()}
    ratio = best["engine"] / best["bare"]
    fused = bool(trainer.optimizer.defaults.get("fused"))
    tag = f"{amp}{' compiled' if compile_ else ''}"
    ctx.note(f"{tag}: engine {best['engine']:.0f} img/s, bare loop {best['bare']:.0f} img/s, "
             f"ratio {ratio:.3f}")
    return {"amp": amp, "compile": compile_, "engine_img_s": round(best["engine"], 1),
            "bare_img_s": round(best["bare"], 1), "ratio": round(ratio, 3),
            "engine_peak_gib": engine_peak, "bare_peak_gib": bare_peak, "fused_sgd": fused,
            "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "check": speed_check(ctx, f"engine / bare loop ({tag})", round(ratio, 3), ">= 0.97",
                                 ratio >= 0.97)}


def part_rn50_eager(ctx: Ctx) -> dict:
    """ResNet-50, 224 px, batch 256, channels_last, synthetic batch on the GPU, eager:
    bf16 and fp16 + GradScaler, the engine against the bare loop, peak memory."""
    rows = [_throughput(ctx, amp, False) for amp in ("bf16", "fp16")]
    checks = [r.pop("check") for r in rows]
    if ctx.cuda:
        checks.append(check("engine uses fused SGD on CUDA", rows[0]["fused_sgd"], "True",
                            rows[0]["fused_sgd"]))
    return {"figures": {"runs": rows}, "checks": checks}


def part_rn50_compile(ctx: Ctx) -> dict:
    """The same with torch.compile (bf16): the bare loop compiles first, the engine's compile
    of the same graph then mostly hits inductor's cache."""
    row = _throughput(ctx, "bf16", True)
    return {"figures": {"runs": [row]}, "checks": [row.pop("check")]}


def _end_to_end(ctx: Ctx, backend: str) -> dict:
    from ltrainer.data_pipelines.loaders import backend_status

    if backend != "torchvision":
        ok, why = backend_status(backend)
        if not ok:
            raise Skip(f"{backend} is not installed here ({why})")
    s = ctx.sizes
    lst = jpeg_list(ctx, s.jpegs, s.jpeg_wh, s.classes)
    extra = {"data.loader": backend, "run.name": backend,
             "data.beton_dir": os.path.join(ctx.work, "betons"),
             "data.dali_threads": max(1, s.workers)}
    cfg = load_config(None, list_overrides(ctx, lst, ctx.work, **extra))
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    loader, sampler = trainer.data.train_loader("uniform", 0)
    first = next(iter(loader))  # FFCV writes its .beton here; every backend starts its workers
    setup_s = time.perf_counter() - t0
    shape, dtype = tuple(first[0].shape), str(first[0].dtype)
    where = "cuda" if first[0].is_cuda else ("pinned" if ctx.cuda and first[0].is_pinned()
                                               else "cpu")
    del first

    def load_epoch():
        n = 0
        for images, labels in trainer.data.train_loader("uniform", 1)[0]:
            images = images.to(ctx.device, non_blocking=True)
            n += len(images)
        return n

    n_img = [0]
    sec = timed(ctx.device, lambda: n_img.__setitem__(0, load_epoch()))
    loader_rate = n_img[0] / sec
    trainer.train_epoch()                                   # warm-up epoch
    steps = sampler.num_batches
    reset_peak(ctx.device)
    sec = timed(ctx.device, trainer.train_epoch)
    rate = steps * s.batch / sec
    release(trainer)
    ctx.note(f"{backend}: loader alone {loader_rate:.0f} img/s, training {rate:.0f} img/s")
    fig = {"backend": backend, "images": s.jpegs, "batch": s.batch, "batch_shape": shape,
           "batch_dtype": dtype, "batch_memory": where, "setup_s": round(setup_s, 1),
           "loader_img_s": round(loader_rate, 1), "train_img_s": round(rate, 1),
           "peak_gib": peak_gib(ctx.device)}
    checks = [check("batch shape [B, 3, H, W]", list(shape), f"[{s.batch}, 3, {s.image}, "
                    f"{s.image}]", shape == (s.batch, 3, s.image, s.image))]
    if ctx.cuda:   # issue 18 item 9: a pageable batch makes the non_blocking copy blocking
        checks.append(check("batches on the GPU or in pinned memory", where, "cuda or pinned",
                            where != "cpu"))
    if backend == "dali":
        checks.append(speed_check(ctx, "RN50 bf16 from JPEGs with DALI", round(rate, 1),
                                  ">= 3000 img/s", rate >= 3000))
    return {"figures": fig, "checks": checks}


def part_e2e_torchvision(ctx):
    """ResNet-50 bf16 trained from JPEGs through the torchvision loader (CPU decode, pinned
    batches copied to the GPU)."""
    return _end_to_end(ctx, "torchvision")


def part_e2e_dali(ctx):
    """The same through DALI (nvJPEG 'mixed' decoding and GPU augmentation on a GPU)."""
    return _end_to_end(ctx, "dali")


def part_e2e_ffcv(ctx):
    """The same through FFCV (.beton written first, batches normalized on the device)."""
    return _end_to_end(ctx, "ffcv")


def part_moco_step(ctx: Ctx) -> dict:
    """MoCo v2 training steps: ResNet-50, K = 65,536, two aug views, bf16, shuffled BN."""
    s = ctx.sizes
    cfg = load_config(None, list_overrides(ctx, small_list(ctx), ctx.work, **{
        "method.name": "moco", "data.augment": "moco", "moco.queue": s.moco_queue,
        "run.name": "moco"}))
    trainer = Trainer(cfg)
    steps = [s.warmup]
    feed_synthetic(trainer, synthetic_batch(ctx, views=2), steps)
    reset_peak(ctx.device)
    engine_rate(trainer, steps, s.warmup)
    rate = engine_rate(trainer, steps, s.steps)
    release(trainer)
    m = trainer.method
    expect_ptr = (s.batch * (s.warmup + s.steps)) % s.moco_queue
    last = _last_train_record(trainer.run_dir)
    fig = {"img_s": round(rate, 1), "peak_gib": peak_gib(ctx.device), "queue": s.moco_queue,
           "queue_ptr": m.queue_ptr, "queue_dtype": str(m.queue.dtype), "last_loss": last.get("loss")}
    return {"figures": fig, "checks": [
        check("queue pointer advanced by the batches", m.queue_ptr, expect_ptr,
              m.queue_ptr == expect_ptr),
        check("loss finite", last.get("loss"), "finite", last.get("loss") is not None
              and np.isfinite(last["loss"]))]}


def _last_train_record(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if r.get("kind") == "train"]
    return recs[-1] if recs else {}


def part_crt_step(ctx: Ctx) -> dict:
    """cRT steps on a frozen ResNet-50: the backbone must not move, the classifier must."""
    from ltrainer.trainer.models import create_model

    s = ctx.sizes
    init = os.path.join(ctx.work, "init.pt")
    torch.save(create_model(s.model, num_classes=s.classes, in_channels=3).state_dict(), init)
    cfg = load_config(None, list_overrides(ctx, small_list(ctx), ctx.work, **{
        "method.name": "crt", "run.name": "crt", "model.init": init}))
    trainer = Trainer(cfg)
    steps = [s.warmup]
    feed_synthetic(trainer, synthetic_batch(ctx), steps)
    model = trainer.method.model
    before_bb = [p.detach().clone() for p in model.backbone.parameters()]
    before_head = [p.detach().clone() for p in model.head.parameters()]
    engine_rate(trainer, steps, s.warmup)
    rate = engine_rate(trainer, steps, s.steps)
    release(trainer)
    bb_same = all(torch.equal(a, b) for a, b in zip(before_bb, model.backbone.parameters()))
    head_moved = any(not torch.equal(a, b) for a, b in zip(before_head, model.head.parameters()))
    return {"figures": {"img_s": round(rate, 1), "peak_gib": peak_gib(ctx.device)},
            "checks": [check("frozen backbone unchanged", bb_same, "True", bb_same),
                       check("classifier updated", head_moved, "True", head_moved)]}


def part_ldam_autocast(ctx: Ctx) -> dict:
    """LDAM under bf16 and fp16 autocast: the loss and its gradient are float32 and equal to
    the loss outside autocast on the same float32 logits."""
    from ltrainer.trainer.losses import create_loss

    counts = [500, 200, 80, 30, 10]
    loss_fn = create_loss("ldam", counts).to(ctx.device)
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(64, 5, generator=g) * 2 - 1).to(ctx.device)
    target = torch.randint(0, 5, (64,), generator=g).to(ctx.device)
    ref = loss_fn(logits, target)
    checks, fig = [], {"fp32_loss": float(ref)}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x = logits.clone().requires_grad_(True)
        with torch.autocast(ctx.device.type, dtype=dtype):
            loss = loss_fn(x, target)
        loss.backward()
        fig[f"{name}_loss"] = float(loss.detach())
        checks += [check(f"loss dtype under {name} autocast", str(loss.dtype), "torch.float32",
                         loss.dtype == torch.float32),
                   check(f"loss under {name} autocast == float32 loss",
                         abs(float(loss) - float(ref)), "<= 1e-6",
                         abs(float(loss) - float(ref)) <= 1e-6),
                   check(f"grad dtype under {name}", str(x.grad.dtype), "torch.float32",
                         x.grad.dtype == torch.float32)]
    return {"figures": fig, "checks": checks}


def part_faiss_knn(ctx: Ctx) -> dict:
    """faiss-gpu exact kNN on a 437,513 x 2,048 bank against faiss-cpu on a subset of queries:
    the same neighbours (a swap only between near-ties). Smoke: faiss-cpu against torch."""
    from ltrainer.trainer.banks import search as bank_search

    try:
        import faiss
    except ImportError as e:
        raise Skip(f"faiss is not installed here ({e})")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not ctx.smoke and gpus == 0:
        raise Skip(f"faiss {faiss.__version__} sees no GPU (faiss-cpu installed, not faiss-gpu)")
    n, d = ctx.sizes.bank
    k, nq = 20, ctx.sizes.queries
    g = torch.Generator(device=ctx.device).manual_seed(0)
    t0 = time.perf_counter()
    bank = F.normalize(torch.randn(n, d, device=ctx.device, generator=g), dim=1).cpu().numpy()
    queries = bank[:nq] + 0.05 * np.random.default_rng(0).standard_normal((nq, d), np.float32)
    make_s = time.perf_counter() - t0
    res = {}
    for dev in (("gpu", "cpu") if not ctx.smoke else ("cpu",)):
        t0 = time.perf_counter()
        index = bank_search.build_index(bank, "flat", "ip", device=dev)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        res[dev] = index.search(queries, k)
        res[dev + "_s"] = (round(build, 2), round(time.perf_counter() - t0, 3))
        del index
    if ctx.smoke:   # the reference: exact similarities in float64
        sims = torch.from_numpy(queries).double() @ torch.from_numpy(bank).double().T
        top, idx = sims.topk(k, dim=1)
        res["ref"] = (top.numpy(), idx.numpy())
    ref_name = "ref" if ctx.smoke else "cpu"
    test_name = "cpu" if ctx.smoke else "gpu"
    (s_a, i_a), (s_b, i_b) = res[test_name], res[ref_name]
    same = (i_a == i_b)
    # a differing id is acceptable only where the two similarities are a near-tie
    ties = np.abs(s_a - s_b) <= 1e-4
    ok = bool(np.all(same | ties))
    fig = {"bank": [n, d], "queries": nq, "k": k, "bank_s": round(make_s, 1),
           "faiss": faiss.__version__, "faiss_gpus": gpus,
           "identical_ids_share": round(float(same.mean()), 5),
           "max_sim_diff": float(np.abs(s_a - s_b).max())}
    for dev in ("gpu", "cpu"):
        if dev + "_s" in res:
            fig[f"{dev}_build_s"], fig[f"{dev}_search_s"] = res[dev + "_s"]
    return {"figures": fig, "checks": [
        check(f"{test_name} neighbours == {ref_name} neighbours (up to near-ties)",
              fig["identical_ids_share"], "1.0 or ties", ok)]}


def part_checkpoint_resume(ctx: Ctx) -> dict:
    """Deterministic mode: a run stopped after 3 steps and resumed from checkpoint_last.pt
    ends with bit-identical weights to an uninterrupted run, on this device."""
    full = not ctx.smoke
    lst = jpeg_list(ctx, 64, (64, 48), 10) if full else small_list(ctx)
    base = {"run.deterministic": True, "data.num_classes": 10,
            "data.batch_size": 16 if full else 8, "data.eval_batch_size": 64,
            "data.workers": 0, "data.image_size": 32 if full else 16,
            "model.name": "resnet18" if full else "resnet8", "sched.epochs": 2,
            "engine.amp": "bf16" if full else "none"}

    def cfg(name, **kw):
        return load_config(None, list_overrides(ctx, lst, ctx.work, **{**base, **kw,
                                                                       "run.name": name}))
    t = Trainer(cfg("whole"))
    t.fit()
    release(t)
    t = Trainer(cfg("resumed", **{"engine.max_steps": 3}))
    t.train_epoch()
    t.save_checkpoint()
    release(t)
    t = Trainer(cfg("resumed", **{"run.allow_change": ["engine.max_steps"]}))
    resumed_at = t.global_step
    t.fit()
    release(t)
    a = torch.load(os.path.join(ctx.work, "whole", "model_final.pt"), weights_only=True)
    b = torch.load(os.path.join(ctx.work, "resumed", "model_final.pt"), weights_only=True)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    return {"figures": {"tensors": len(a), "differing": diff[:10], "resumed_at_step": resumed_at,
                        "device": str(ctx.device), "model": base["model.name"]},
            "checks": [check("resumed at global step 3", resumed_at, 3, resumed_at == 3),
                       check("resumed weights bit-identical", len(diff), 0, not diff)]}


def part_fmnist_gpu_cpu(ctx: Ctx) -> dict:
    """configs/fmnist_lt_ce.yaml for a few epochs on the GPU and on the CPU: the first step's
    loss within 1e-3 (relative) and the balanced error within 5 points. Smoke: CPU twice."""
    from ltrainer.data_pipelines.sources import FASHION_MNIST_ROOT

    root = ctx.fmnist_root or FASHION_MNIST_ROOT
    if not os.path.exists(os.path.join(root, "train-labels-idx1-ubyte.gz")):
        raise Skip(f"Fashion-MNIST not found in {root} (apt-get install dataset-fashion-mnist, "
                   f"or copy its 4 files and pass --fmnist-root)")
    e = ctx.sizes.fm_epochs
    over = [f"run.out_dir={ctx.work}", f"data.root={root}", f"sched.epochs={e}",
            f"sched.milestones=[{e}]", "sched.warmup_epochs=0", "eval.every_epochs=0",
            "engine.log_every=1", "engine.progress=none"]
    if ctx.smoke:
        from ltrainer.data_pipelines.sources import read_fashion_mnist

        labels = read_fashion_mnist(root, train=False).labels
        test = os.path.join(ctx.work, "test200.txt")
        with open(test, "w") as f:
            f.writelines(f"{i} {int(labels[i])}\n" for i in range(200))
        over += ["data.n_max=60", "data.rho=10", "data.eval_batch_size=200",
                 f"data.test_list={test}"]
    results = {}
    for dev in ("cuda", "cpu") if ctx.cuda else ("cpu", "cpu2"):
        cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"),
                          over + [f"engine.device={dev.rstrip('2')}", f"run.name={dev}"])
        t0 = time.perf_counter()
        from ltrainer.trainer.engine import train
        r = train(cfg)
        with open(os.path.join(ctx.work, dev, "metrics.jsonl")) as f:
            first = next(json.loads(line) for line in f if '"train"' in line)
        results[dev] = {"balanced_error": r["balanced_error"], "first_loss": first["loss"],
                        "seconds": round(time.perf_counter() - t0, 1)}
    a, b = list(results.values())
    rel = abs(a["first_loss"] - b["first_loss"]) / abs(b["first_loss"])
    gap = abs(a["balanced_error"] - b["balanced_error"])
    return {"figures": results, "checks": [
        check("first-step loss, relative difference", round(rel, 6), "<= 1e-3", rel <= 1e-3),
        check("balanced error difference (points)", round(gap, 2), "<= 5", gap <= 5)]}


def part_staged_input(ctx: Ctx) -> dict:
    """Issue 14 item 4: uint8 MoCo batches (pinned) through gpu_input.StagedLoader: copied on
    a side stream, colour/blur/flip/normalisation on the device. The same pixels as the CPU
    stage (same seeds), no host synchronisation while iterating (set_sync_debug_mode), and the
    stage's img/s at full size. Smoke: the CPU path against itself at 32 px."""
    from ltrainer.data_pipelines.augment import AugmentSpec
    from ltrainer.data_pipelines.batch_aug import BatchAugment
    from ltrainer.data_pipelines.gpu_input import StagedLoader

    size, n, bs = (32, 64, 16) if ctx.smoke else (224, 512, 128)
    spec = AugmentSpec("moco", True, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 2, 3, size, size), generator=g, dtype=torch.uint8)
    if ctx.cuda:
        x = x.pin_memory()
    y = torch.arange(n)
    keys = [(i, 1000 + 7 * i) for i in range(n)]
    batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    staged = StagedLoader(batches, BatchAugment(spec, flip=True), keys, bs, device=ctx.device)
    ref = StagedLoader(batches, BatchAugment(spec, flip=True), keys, bs, device="cpu")
    want = torch.cat([b for b, _ in ref])
    got = torch.cat([b.cpu() for b, _ in staged])
    err = float((got - want).abs().max())
    checks = [check("device stage = CPU stage (max abs difference)", round(err, 6), "<= 1e-3",
                    err <= 1e-3)]
    fig = {"images": n, "size": size, "batch": bs, "max_abs_diff": err}
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            t0 = time.perf_counter()
            outs = [b for b, _ in staged]
            synced = None
        except RuntimeError as exc:
            synced, outs = str(exc).splitlines()[0], []
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        fig["stage_img_per_s"] = round(n / (time.perf_counter() - t0), 1) if outs else None
        fig["on_device"] = all(o.is_cuda for o in outs)
        checks.append(check("no host synchronisation while iterating", synced or "none",
                            "none", synced is None))
        checks.append(check("batches on the GPU", fig["on_device"], "True", fig["on_device"]))
    return {"figures": fig, "checks": checks}
