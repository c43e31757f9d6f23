"""Process-group set-up from whatever started us (torchrun, our own spawner, or Slurm),
and the few collectives the engine needs.

gloo on CPU, NCCL on GPU, chosen automatically; every helper is a no-op for one process, so the
engine never branches on `world_size == 1` itself.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names, default=None):
    for n in names:
        if os.environ.get(n) not in (None, ""):
            return int(os.environ[n])
    return default


def env_ranks() -> tuple[int, int, int, int]:
    """(rank, world, local_rank, local_world) from torchrun's or Slurm's variables."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=None)
    if local_world is None:
        local_world = world if world == 1 else max(1, torch.cuda.device_count() or 1)
    return rank, world, local_rank, local_world


def pick_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("engine.device = 'cuda' but no CUDA device is visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def batch_to_device(batch, device: torch.device, memory_format=torch.contiguous_format):
    """(images, labels) on the training device, 4-d images in the model's memory format."""
    images, labels = batch
    images = images.to(device, non_blocking=True)
    if images.dim() == 4:
        images = images.contiguous(memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


def setup(device_choice: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group described by the environment (or run alone)."""
    rank, world, local_rank, local_world = env_ranks()
    device = pick_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_if_local())
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, local_world, device)


def _loopback_if_local() -> str:
    """gloo picks an interface from the hostname, which may not be routable in containers; on a
    single host (MASTER_ADDR local) the loopback interface always works."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return "lo" if addr in ("127.0.0.1", "localhost") else ""


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (sizes may differ by rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    pad = torch.zeros((max_n - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    buf = [torch.empty((max_n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
           for _ in range(world)]
    dist.all_gather(buf, torch.cat([t, pad]))
    return torch.cat([b[: int(s.item())] for b, s in zip(buf, sizes)])


def rank_ordered_mean_hook(state, bucket):
    """DDP comm hook: average a gradient bucket by summing the ranks' copies in rank order.

    An all-reduce adds the ranks' values in an order that depends on how DDP cut the buckets,
    and DDP re-cuts them after the first step of every new process, so a resumed run with more
    than 2 ranks rounds differently from an uninterrupted one. Gathering every rank's copy and
    adding them 0, 1, 2, ... makes each element's sum independent of the buckets. It moves W
    times the data of an all-reduce, so the engine uses it only in deterministic mode on CPU."""
    grads = bucket.buffer()
    parts = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    fut = dist.all_gather(parts, grads, async_op=True).get_future()

    def average(_):
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total.div_(len(parts))

    return fut.then(average)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (so all ranks stop together)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _local_worker(local_rank: int, world: int, port: int, fn, kwargs: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world))
    try:
        fn(**kwargs)
    finally:
        cleanup()


def run_local(fn, nproc: int, kwargs: dict):
    """fn(**kwargs) on `nproc` local processes that form one process group (a tool's --nproc);
    in this process when nproc <= 1 or under torchrun. `fn` must be a module-level function."""
    if nproc <= 1 or "RANK" in os.environ:
        return fn(**kwargs)
    import torch.multiprocessing as mp

    mp.start_processes(_local_worker, args=(nproc, free_port(), fn, kwargs), nprocs=nproc,
                       start_method="spawn")
    return None
