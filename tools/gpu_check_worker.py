"""The process that tools/gpu_check.py's `nccl` part starts under torchrun, one per GPU:

    torchrun --nproc_per_node N tools/gpu_check_worker.py OUT.json cuda|cpu

It joins the process group through the engine's own set-up (trainer.distributed.setup: NCCL
on GPUs, gloo on CPU; a group of one on a one-GPU machine), checks an all_reduce and
all_gather_cat, and times a 256 MiB all_reduce (bus bandwidth with several GPUs). Kept apart
from gpu_check.py so that each rank imports only torch and trainer.distributed.
"""
from __future__ import annotations

import json
import os
import sys
import time


import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ltrainer.trainer import distributed as du  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(out: str, device: str) -> int:
    info = du.setup(device, "auto")
    dev, w = info.device, info.world_size
    if not dist.is_initialized():
        # one GPU: the engine runs without a process group, so NCCL would go unchecked; a
        # group of one still initialises NCCL and runs its kernels
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1,
                                device_id=dev if dev.type == "cuda" else None)
    t = torch.tensor([float(info.rank + 1)], device=dev)
    dist.all_reduce(t)
    rows = torch.full((info.rank + 1, 2), float(info.rank), device=dev)
    got = du.all_gather_cat(rows)
    expect = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(w)])
    res = {"backend": dist.get_backend(), "nccl": _nccl_version(dev), "world": w,
           "all_reduce": float(t.item()), "expected": float(w * (w + 1) / 2),
           "gather_ok": bool(torch.equal(got.cpu(), expect))}
    buf = torch.ones((256 if dev.type == "cuda" else 1) * 2 ** 18, device=dev)
    for _ in range(3):
        dist.all_reduce(buf)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(buf)
    _sync(dev)
    sec = (time.perf_counter() - t0) / 10
    res["all_reduce_mib"] = buf.numel() * 4 / 2 ** 20
    res["all_reduce_ms"] = round(sec * 1e3, 3)
    if w > 1:   # nccl-tests' bus bandwidth: 2 (W - 1) / W of the buffer crosses each link
        res["all_reduce_busbw_gbs"] = round(buf.numel() * 4 * 2 * (w - 1) / w / sec / 1e9, 2)
    if info.is_main:
        with open(out, "w") as f:
            json.dump(res, f)
    du.cleanup()
    return 0


def _nccl_version(dev) -> str | None:
    if dev.type != "cuda":
        return None
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
