"""The picklable job that launchers/submit.py hands to submitit, as small as DINO's
run_with_submitit.Trainer: the plan and a few settings travel; what a task does (a training
thread, stop signals, requeue, peer failures) is launchers/slurm_task.py."""
from __future__ import annotations

import os


class TrainJob:
    """Runs a validated plan (list of trainer.pipeline.Stage) on every task of a Slurm job."""

    def __init__(self, plan, run_root: str, signal_delay_s: int = 90,
                 peer_failure_wait_s: int = 360, local: bool = False, cwd: str | None = None):
        self.plan, self.run_root, self.local = plan, run_root, local
        self.signal_delay_s, self.peer_failure_wait_s = signal_delay_s, peer_failure_wait_s
        self.cwd = cwd or os.getcwd()   # relative config paths mean what they meant at submission

    def __call__(self):
        from ltrainer.launchers.slurm_task import run_task
        return run_task(self)

    def checkpoint(self, *args, **kwargs):
        """submitit, on rank 0 at SIGUSR2: save at the next step boundary, then requeue the same
        job (a fresh copy: the plan resumes from its checkpoints, finished stages skipped)."""
        import submitit

        from ltrainer.launchers.slurm_task import save_before_requeue
        save_before_requeue(self)
        return submitit.helpers.DelayedSubmission(type(self)(
            self.plan, self.run_root, self.signal_delay_s, self.peer_failure_wait_s, self.local,
            self.cwd))
