"""What each Slurm task does when it runs launchers/slurm_job.py's TrainJob (the small picklable
object submitit carries): every task (one per GPU, or one per node on CPU) calls run_task.

Why the training runs in a worker thread: submitit calls `checkpoint()` from its SIGUSR2 handler,
i.e. on the main thread, at an arbitrary point of a training step. A handler cannot save there
(the optimizer may be half-way through a step and the other ranks in a collective), and if
training ran on the main thread the handler could not wait for it either. So the main thread
only waits; `checkpoint()` asks the engine to stop (`request_stop()`), waits until the worker
has saved at the next step boundary on every rank and raised `Preempted`, and only then returns
the resubmission. The requeued job runs the same plan; finished stages are skipped and the
interrupted one resumes from its checkpoint.

Signals and what they mean here:
- SIGUSR2 (Slurm's --signal before the time limit, or a preemption notice): save and requeue.
  Rank 0 requeues (through submitit, which counts time-outs against max_num_timeout).
- SIGTERM (scancel, `scontrol requeue`, preemption, node shutdown): save and let Slurm decide
  (Slurm itself requeues or cancels); rank 0 waits a moment in case SIGUSR2 follows, as it does
  for preemption.
- a peer rank dying (node failure): the surviving ranks wait for Slurm to requeue the job instead
  of failing at once, because a failed job would not be requeued.

No rank writes a result while the job is going to be requeued, and each rank deletes the stale
result of an earlier attempt when it starts, so submitit never reports an old outcome.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

PEER_FAILURE_HINTS = ("connection closed by peer", "connection reset", "broken pipe",
                      "connection refused", "socket", "gloo", "nccl", "timed out",
                      "no route to host")

_current: list = []   # the _Runtime of this process's task (one task per process)


def save_before_requeue(job):
    """TrainJob.checkpoint: submitit calls it on rank 0 when SIGUSR2 arrives (time limit
    near, or preemption).

    Ask the engine to stop, wait until the worker has saved at a step boundary (bounded by
    the warning time Slurm gives); TrainJob.checkpoint then returns the resubmission. If no
    boundary comes in time (a long evaluation, say), the job is requeued anyway and resumes
    from the last checkpoint written, which is always complete because checkpoints are
    written atomically."""
    from ltrainer.trainer.engine import request_stop
    rt = _current[0] if _current else None
    if rt is not None and rt.worker is not None and rt.worker.is_alive():
        request_stop()
        wait_s = max(5.0, job.signal_delay_s - 30.0)
        deadline = time.time() + wait_s
        while rt.worker.is_alive() and time.time() < deadline:
            rt.worker.join(0.2)
        if rt.worker.is_alive():
            rt.say(f"no step boundary within {wait_s:.0f} s: requeueing from the last "
                   f"checkpoint on disk")
        else:
            rt.say("checkpoint written; requeueing")


def run_task(job):
    import submitit
    env = submitit.JobEnvironment()
    rt = _Runtime(env)
    _current[:] = [rt]
    _forget_stale_result(env)
    os.chdir(job.cwd)
    _export_dist_env(job)
    stages = [copy.deepcopy(s) for s in job.plan]
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK") or 1)
    for s in stages:
        if not s.cfg.engine.threads:
            s.cfg.engine.threads = threads  # one task per core budget, not all host cores
    _install_signals(rt)

    rt.worker = threading.Thread(target=_work, args=(job, rt, stages), name="train",
                                 daemon=True)
    rt.worker.start()
    while rt.worker.is_alive():
        rt.worker.join(0.5)
    return _finish(job, rt)


def _export_dist_env(job):
    """MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from submitit's view of Slurm. Node
    names need not resolve (on one host they are aliases): use Slurm's NodeAddr then."""
    import submitit
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["MASTER_ADDR"] = ("127.0.0.1" if job.local
                                 else _node_address(dist_env.master_addr))


def _install_signals(rt: "_Runtime"):
    from ltrainer.trainer.engine import request_stop
    submitit_usr2 = signal.getsignal(signal.SIGUSR2)

    def on_usr2(signum, frame):
        rt.signals.add("USR2")
        request_stop()
        _submitit_requeue(rt, signum, frame)

    def on_term(signum, frame):
        rt.signals.add("TERM")
        request_stop()

    signal.signal(signal.SIGUSR2, on_usr2)
    signal.signal(signal.SIGTERM, on_term)
    rt.submitit_usr2 = submitit_usr2


def _work(job, rt: "_Runtime", stages):
    from ltrainer.trainer import distributed as dist_utils
    from ltrainer.trainer.engine import Preempted
    from ltrainer.trainer.pipeline import run_plan
    try:
        cfg = stages[0].cfg
        info = dist_utils.setup(cfg.engine.device, cfg.dist.backend)
        rt.rank, rt.world = info.rank, info.world_size
        import torch
        seen = dist_utils.all_reduce_mean(torch.ones(1, device=info.device)) * info.world_size
        rt.record_rank(job.run_root, info, int(round(float(seen))))
        rt.joined = True
        try:
            rt.results = run_plan(stages)
            rt.outcome = "done"
        except Preempted:
            # did any rank get SIGUSR2? then rank 0 must requeue even if it only saw SIGTERM
            rt.requeue = dist_utils.any_rank("USR2" in rt.signals)
            rt.outcome = "preempted"
        if rt.outcome == "done":
            dist_utils.barrier()
            dist_utils.cleanup()
    except BaseException as e:  # noqa: BLE001 - handed to the main thread
        rt.error = e
        rt.outcome = "error"


def _finish(job, rt: "_Runtime"):
    from ltrainer.trainer.engine import _STOP
    if rt.outcome == "done":
        rt.say("finished")
        return {"run_root": job.run_root, "results": rt.results}
    if rt.outcome == "preempted":
        if rt.rank != 0:
            rt.say("stopped at a checkpoint; rank 0 decides about the requeue")
            sys.exit(0)  # SystemExit: submitit writes no result for this attempt
        if rt.requeue:
            _submitit_requeue(rt, signal.SIGUSR2, None)  # checkpoint() returns at once
        # SIGTERM only: Slurm is cancelling or requeueing us (it kills us after KillWait);
        # a SIGUSR2 may still follow (preemption sends both) and would requeue from here
        rt.say("stopped at a checkpoint after SIGTERM; waiting for Slurm")
        _sleep_until(lambda: False, 15)
        sys.exit(1)
    err = rt.error
    if rt.joined and rt.world > 1 and _looks_like_peer_failure(err):
        # A node died: Slurm requeues the job once it notices; failing now would end it.
        _STOP.clear()
        rt.say(f"a peer rank failed ({str(err).splitlines()[0][:200]}); waiting up to "
               f"{job.peer_failure_wait_s} s for Slurm to requeue the job")
        rt.signals.clear()
        _sleep_until(lambda: rt.signals, job.peer_failure_wait_s)
        if rt.signals:
            rt.say(f"got {'/'.join(sorted(rt.signals))} from Slurm: leaving")
            sys.exit(0)
    raise err


class _Runtime:
    """What one task knows about itself while it runs."""

    def __init__(self, env):
        self.env = env
        self.worker: threading.Thread | None = None
        self.signals: set[str] = set()
        self.outcome = None
        self.results = None
        self.error: BaseException | None = None
        self.requeue = False
        self.rank, self.world = env.global_rank, env.num_tasks
        self.submitit_usr2 = None
        self.requeueing = False
        self.joined = False  # in the process group: later communication errors mean a lost peer

    def say(self, msg: str):
        node = os.environ.get("SLURMD_NODENAME", "local")
        print(f"[{time.strftime('%H:%M:%S')}] rank {self.rank} ({node}): {msg}", flush=True)

    def record_rank(self, run_root: str, info, seen_world: int):
        """One line per rank and attempt, in the task's log and in RUN_ROOT/ranks.jsonl, so that
        anyone can check that every rank of every attempt took part."""
        rec = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
               "job_id": self.env.job_id, "attempt": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
               "rank": info.rank, "world_size": info.world_size, "allreduce_world": seen_world,
               "local_rank": info.local_rank, "node": os.environ.get("SLURMD_NODENAME", "local"),
               "node_id": self.env.node, "pid": os.getpid(), "device": str(info.device),
               "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"}
        self.say(f"joined rank {info.rank}/{info.world_size} (all-reduce saw {seen_world}) "
                 f"job {rec['job_id']} attempt {rec['attempt']}")
        os.makedirs(run_root, exist_ok=True)
        fd = os.open(os.path.join(run_root, "ranks.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())  # one write: lines never interleave
        finally:
            os.close(fd)


def _submitit_requeue(rt: _Runtime, signum, frame):
    """Hand over to submitit's own SIGUSR2 handler, once per process: on rank 0 it calls
    checkpoint() (which waits for the save), dumps the resubmission, runs `scontrol requeue`
    and exits; on other ranks it only logs."""
    if rt.requeueing or not callable(rt.submitit_usr2):
        return
    rt.requeueing = True
    try:
        rt.submitit_usr2(signum, frame)
    except SystemExit:
        if rt.worker is not None and rt.worker.is_alive():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # the worker is stuck in a collective: do not wait for it at exit
        raise


def _sleep_until(done, seconds: float):
    end = time.time() + seconds
    while not done() and time.time() < end:
        time.sleep(0.2)


def _looks_like_peer_failure(err: BaseException | None) -> bool:
    if err is None:
        return False
    try:
        import torch.distributed as dist
        if isinstance(err, getattr(dist, "DistError", ())):
            return True
    except Exception:
        pass
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(h in text for h in PEER_FAILURE_HINTS)


def _forget_stale_result(env):
    """A requeued attempt runs under the same job id: an outcome file an earlier attempt of this
    task left behind (say, after a node failure) would be read as this attempt's result."""
    try:
        env.paths.result_pickle.unlink(missing_ok=True)
    except OSError:
        pass


def _node_address(name: str) -> str:
    """The address of a Slurm node: its name if that resolves, else Slurm's NodeAddr."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True,
                             text=True, timeout=30).stdout
        for field in out.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    except (OSError, subprocess.SubprocessError):
        pass
    raise RuntimeError(f"cannot resolve the address of node '{name}' (not in DNS and "
                       f"`scontrol show node` gives no NodeAddr)")
