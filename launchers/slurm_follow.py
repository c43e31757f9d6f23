"""Following submitted jobs: rank 0's run.log lines as they are written, each task's outcome,
and the wait that ends a job as soon as one of its tasks failed."""
from __future__ import annotations

import os
import time

from ltrainer.launchers.slurm_submission import task_logs

class LogTail:
    """New lines of the stage run.log files (rank 0 writes them, append-only across attempts)."""

    def __init__(self, plan):
        self.files = [(s.name if len(plan) > 1 else "", os.path.join(s.run_dir, "run.log"))
                      for s in plan]
        self.offsets = {}
        for _, path in self.files:  # only what this submission adds
            self.offsets[path] = os.path.getsize(path) if os.path.exists(path) else 0

    def poll(self):
        for stage, path in self.files:
            if not os.path.exists(path):
                continue
            with open(path) as f:
                f.seek(self.offsets[path])
                text = f.read()
            if not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]
            self.offsets[path] += len(text.encode())
            for line in text.splitlines():
                print(f"{stage + ': ' if stage else ''}{line}", flush=True)


def outcome_of(task):
    """('success', None) / ('error', trace) / (None, None) for one task: once its result file
    exists (submitit writes it atomically), the public Job.exception() reads it."""
    if not task.paths.result_pickle.exists():
        return None, None
    error = task.exception()
    return ("error", str(error)) if error is not None else ("success", None)


def wait_jobs(jobs, tick=None, poll: float = 2.0, state_every: float = 10.0) -> dict:
    """Wait until every job has ended; returns {job_id: (ok, message)}. A task that failed ends
    the wait for its job at once (its peers would only wait for Slurm), and the job is cancelled."""
    import submitit
    states, done = {}, {}
    last_check = 0.0
    while len(done) < len(jobs):
        if tick:
            tick()
        now = time.time()
        if now - last_check >= state_every:
            last_check = now
            if isinstance(jobs[0], submitit.SlurmJob):
                jobs[0].watcher.update()
        for job in jobs:
            jid = str(job.job_id)
            if jid in done:
                continue
            tasks = [job.task(t) for t in range(job.num_tasks)] if job.num_tasks > 1 else [job]
            outcomes = [outcome_of(t) for t in tasks]
            failed = [(t, trace) for t, (kind, trace) in enumerate(outcomes) if kind == "error"]
            state = (job.watcher.get_state(jid, mode="cache") if isinstance(job, submitit.SlurmJob)
                     else job.state)  # a local job: from its process, no query
            if state and states.get(jid) != state:
                states[jid] = state
                print(f"job {jid}: {state}", flush=True)
            if failed:
                t, trace = failed[0]
                job.cancel(check=False)
                done[jid] = (False, f"task {t} failed:\n{trace}")
            elif all(kind == "success" for kind, _ in outcomes):
                done[jid] = (True, "")
            elif job.done():
                kind = [k for k, _ in outcomes]
                done[jid] = (False, f"ended in state {job.state} without a result from "
                                    f"task(s) {[t for t, k in enumerate(kind) if k is None]}; "
                                    f"see {task_logs(job)[0]}")
        if len(done) < len(jobs):
            time.sleep(poll)
    if tick:
        tick()
    return done
