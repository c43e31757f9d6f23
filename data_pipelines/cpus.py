"""How many cores one training process may use, shared by torch's threads and loader workers.

On a shared machine or inside a Slurm allocation the machine's core count is the wrong
budget: a run that takes all of them (x its loader workers) oversubscribes its neighbours and
itself. The budget, in order: OMP_NUM_THREADS (the user's or torchrun's choice, per process),
SLURM_CPUS_PER_TASK (Slurm's allocation of this task), else the cores this process may run on
(its affinity mask) divided among the local processes.
"""
from __future__ import annotations

import os


def _positive_int(name: str) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def local_processes() -> int:
    """Training processes on this machine: LOCAL_WORLD_SIZE (torchrun, --nproc), else Slurm's
    tasks on this node, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        n = _positive_int(name)
        if n:
            return n
    return 1


def cpus_per_process(local_world_size: int | None = None, omp: bool = True) -> int:
    """Cores one process may use (>= 1): OMP_NUM_THREADS (omp=False: not read), then
    SLURM_CPUS_PER_TASK, else its affinity cores / `local_world_size` (default:
    local_processes())."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")[0 if omp else 1:]:
        n = _positive_int(name)
        if n:
            return n
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size or local_processes()))


def loader_workers(configured: int, local_world_size: int | None = None) -> int:
    """DataLoader workers per process: data.workers, capped to the cores of this process
    minus the one its training loop needs (0: load in the training process). OMP_NUM_THREADS
    sizes compute threads, not this: torchrun sets it to 1 for every rank."""
    return max(0, min(int(configured), cpus_per_process(local_world_size, omp=False) - 1))
