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
    """(rank, world, local_rank, local_world) from torchrun's or Slurm's variables. Slurm's
    count only inside a task (srun sets SLURM_PROCID): a plain `python` in an salloc shell,
    where SLURM_NTASKS describes the allocation, runs alone."""
    slurm = "SLURM_PROCID" in os.environ
    rank = _env_int("RANK", *(["SLURM_PROCID"] if slurm else []), default=0)
    world = _env_int("WORLD_SIZE", *(["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"] if slurm else []),
                     default=1)
    local_rank = _env_int("LOCAL_RANK", *(["SLURM_LOCALID"] if slurm else []), default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", *(["SLURM_NTASKS_PER_NODE"] if slurm else []),
                           default=None)
    if local_world is None:
        local_world = world if world == 1 else max(1, torch.cuda.device_count() or 1)
    return rank, world, local_rank, local_world


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list in its compact form: 'gpu[07-10,12],cpu1' ->
    'gpu07', 'rack[1-2]-n[01-04]' -> 'rack1-n01' (what `scontrol show hostnames` prints first)."""
    out, depth, i = [], 0, 0
    while i < len(nodelist):
        c = nodelist[i]
        if c == "," and depth == 0:
            break
        if c == "[":
            end = nodelist.find("]", i)
            if end < 0:
                raise ValueError(f"Slurm node list {nodelist!r}: '[' without ']'")
            out.append(nodelist[i + 1:end].split(",")[0].split("-")[0])
            i = end + 1
            continue
        out.append(c)
        i += 1
    host = "".join(out).strip()
    if not host:
        raise ValueError(f"Slurm node list {nodelist!r}: no host name")
    return host


def slurm_port(job_id: str, step_id: str | None = None) -> int:
    """A rendezvous port every task of a Slurm job step derives alike (below the ephemeral
    range, so an outgoing connection rarely holds it)."""
    return 15000 + (int(job_id) * 8 + int(step_id or 0)) % 17000


def slurm_rendezvous() -> None:
    """`srun python launchers/train.py`: Slurm gives each task its rank but no MASTER_ADDR /
    MASTER_PORT for env:// initialisation; derive them from the step's first node (where task
    0 runs) and the job id, unless set already (torchrun, submitit, the user)."""
    env = os.environ
    if "SLURM_PROCID" not in env or not env.get("SLURM_JOB_ID"):
        return
    if not env.get("MASTER_ADDR"):
        nodes = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                       "SLURM_NODELIST") if env.get(k)), None)
        if nodes is None:
            raise RuntimeError("running under Slurm (SLURM_PROCID is set) without MASTER_ADDR "
                               "and without SLURM_JOB_NODELIST: set MASTER_ADDR to the first "
                               "node of the job")
        env["MASTER_ADDR"] = first_host(nodes)
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(slurm_port(env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID")))


def pick_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    """The CUDA device of this local rank; modulo the visible count, for clusters that bind
    one GPU per task (each task then sees its GPU as device 0 whatever its local rank)."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("engine.device = 'cuda' but no CUDA device is visible")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


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
        slurm_rendezvous()
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


def _enabled() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def gather_sizes(n: int, device) -> list[int]:
    """Every rank's `n`, in rank order: one small all_gather and one host sync (the device
    is the backend's: CUDA for NCCL)."""
    if not _enabled():
        return [int(n)]
    t = torch.tensor([int(n)], device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).tolist()


def all_gather_cat(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (sizes may differ by rank). With the
    ranks' `sizes` known already, no size exchange and no host sync."""
    if not _enabled():
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], t.device)
    max_n = max(sizes)
    pad = t.new_zeros((max_n - t.shape[0],) + tuple(t.shape[1:]))
    buf = [t.new_empty((max_n,) + tuple(t.shape[1:])) for _ in sizes]
    dist.all_gather(buf, torch.cat([t, pad]) if len(pad) else t.contiguous())
    return torch.cat([b[:n] for b, n in zip(buf, sizes)])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t` (a copy; `t` itself when there is one process)."""
    if _enabled():
        t = t.clone()
        dist.all_reduce(t)
    return t


def merge_counts(keys, counts, device) -> tuple:
    """Sparse counts of every rank summed: each rank has unique int64 `keys` with `counts`
    (numpy); returns the union of keys, sorted, and their summed counts, on every rank. The
    data moved grows with the distinct keys, not with the key space (a confusion matrix of
    C x C cells has at most one key per evaluated image)."""
    import numpy as np
    if not _enabled():
        return np.asarray(keys, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    pair = torch.stack([torch.as_tensor(keys, dtype=torch.long),
                        torch.as_tensor(counts, dtype=torch.long)], 1).to(device)
    pair = all_gather_cat(pair).cpu().numpy()
    merged, inverse = np.unique(pair[:, 0], return_inverse=True)
    return merged, np.bincount(inverse, weights=pair[:, 1], minlength=len(merged)).astype(np.int64)


def all_to_all_rows(rows: torch.Tensor, send_counts: list[int],
                    recv_counts: list[int]) -> torch.Tensor:
    """Rows [sum(send_counts), ...] cut in rank order, the r-th piece sent to rank r; returns
    the pieces received from ranks 0, 1, ... concatenated (gloo and NCCL both support it)."""
    if not _enabled():
        return rows
    out = rows.new_empty((sum(recv_counts),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts)
    return out


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


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small objects: per-rank RNG states)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(modules, src: int = 0):
    """Give every rank rank `src`'s buffers (BatchNorm running statistics, ...) of these
    modules: DDP syncs buffers before each forward only, so after the last step each rank
    keeps its own, and ranks would evaluate different models while only rank 0's is saved."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    seen = set()
    for module in modules:
        for buf in module.buffers():
            if id(buf) not in seen:
                seen.add(id(buf))
                dist.broadcast(buf.data, src=src)


def _local_worker(local_rank: int, world: int, port: int, fn, kwargs: dict, result_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world))
    try:
        result = fn(**kwargs)
    finally:
        cleanup()
    if local_rank == 0 and result is not None:
        import json
        with open(result_path, "w") as f:
            json.dump(result, f)


def run_local(fn, nproc: int, kwargs: dict, forward_signals=()):
    """fn(**kwargs) on `nproc` local processes that form one process group: the one local
    spawner (launchers/train.py --nproc, a tool's --nproc, tests). In this process when
    nproc <= 1 or under torchrun. `fn` must be a module-level function; returns rank 0's
    return value (JSON-able, or None). Signals in `forward_signals` that reach this process go
    to every child (a stop request). A child exiting with a status raises
    torch.multiprocessing.ProcessExitedException (`.exit_code`); an exception in a child,
    ProcessRaisedException."""
    if nproc <= 1 or "RANK" in os.environ:
        return fn(**kwargs)
    import json
    import signal
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        ctx = mp.start_processes(_local_worker, args=(nproc, free_port(), fn, kwargs, out),
                                 nprocs=nproc, start_method="spawn", join=False)

        def forward(signum, _frame):
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, signum)
        before = {s: signal.signal(s, forward) for s in forward_signals}
        try:
            while not ctx.join():
                pass
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
        if not os.path.exists(out):
            return None
        with open(out) as f:
            return json.load(f)


def sync_batchnorm(module: torch.nn.Module, wanted: bool, info: DistInfo):
    """(module, note): BatchNorm layers made SyncBatchNorm when `model.sync_bn` asks for it and
    it can run: CUDA with several processes (NCCL). At a few images per GPU, per-rank batch
    statistics are too noisy; gloo has no SyncBatchNorm, and alone it equals BatchNorm, so
    elsewhere the module stays as it is and the note says so."""
    if not wanted:
        return module, ""
    if info.enabled and info.device.type == "cuda":
        return (torch.nn.SyncBatchNorm.convert_sync_batchnorm(module),
                f"model.sync_bn: BatchNorm statistics over all {info.world_size} ranks")
    why = "one process" if not info.enabled else "no SyncBatchNorm on CPU (gloo)"
    return module, f"model.sync_bn ignored here ({why}): per-rank BatchNorm"
