"""Submitting through submitit: one executor per submission, in a fresh folder under the run
folder, with the job's Slurm parameters; the job object is launchers/slurm_job.py's TrainJob."""
from __future__ import annotations

import json
import os
import sys
import time

from ltrainer.launchers.slurm_job import TrainJob

# variables of an enclosing torchrun/Slurm job that must not leak into the jobs we submit
LEAKY_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GLOO_SOCKET_IFNAME")


def run_root_of(plan) -> str:
    """The run folder: the stage folder of a plain config, the stages' parent for a pipeline
    (a pipeline's stages are named differently from their run name 'base/stage')."""
    if len(plan) == 1 and plan[0].name == plan[0].cfg.run.name:
        return os.path.abspath(plan[0].run_dir)
    return os.path.abspath(os.path.dirname(plan[0].run_dir))


def make_executor(folder: str, s: dict, local: bool, name: str, array: bool = False):
    import submitit
    ex = submitit.AutoExecutor(folder=folder, cluster="local" if local else "slurm",
                               slurm_max_num_timeout=s["max_num_timeout"])
    params = dict(name=s["job_name"] or name, timeout_min=s["timeout_min"],
                  nodes=1 if local else s["nodes"],
                  tasks_per_node=s["tasks_per_node"] * (s["nodes"] if local else 1),
                  cpus_per_task=s["cpus_per_task"], gpus_per_node=s["gpus_per_node"] or None,
                  mem_gb=s["mem_gb"])
    if not local:
        extra = dict(s["additional"] or {})
        for key in ("account", "qos", "constraint"):
            if s[key]:
                extra[key] = s[key]
        params.update(slurm_partition=s["partition"], slurm_signal_delay_s=s["signal_delay_s"],
                      slurm_setup=list(s["setup"]) or None,
                      slurm_additional_parameters=extra or None)
        if array:
            params["slurm_array_parallelism"] = s["array_parallelism"]
    ex.update_parameters(**params)
    return ex


def clean_env():
    """Jobs inherit this environment: drop an enclosing job's rank variables. (The job object
    is unpickled by this venv's python, where the project is installed.)"""
    for k in LEAKY_ENV:
        os.environ.pop(k, None)


def new_folder(parent: str) -> str:
    """A fresh submitit folder per submission: job ids repeat after a controller restart, and an
    old job's result file with the same id must never be read as this one's."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        folder = os.path.join(parent, "slurm", f"{stamp}-{os.getpid()}-{i}")
        if not os.path.exists(folder):
            os.makedirs(folder)
            return folder
    raise RuntimeError("cannot create a submitit folder")


def submit_plan(plan, s: dict, local: bool):
    run_root = run_root_of(plan)
    folder = new_folder(run_root)
    ex = make_executor(folder, s, local, name=os.path.basename(run_root))
    job = ex.submit(TrainJob(plan, run_root, signal_delay_s=s["signal_delay_s"],
                             peer_failure_wait_s=s["peer_failure_wait_s"], local=local))
    record = {"job_id": str(job.job_id), "folder": folder, "run_root": run_root,
              "cluster": "local" if local else "slurm", "nodes": s["nodes"],
              "tasks": job.num_tasks, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": sys.argv}
    with open(os.path.join(folder, "submission.json"), "w") as f:
        json.dump(record, f, indent=1)
    return job, record


def task_logs(job) -> list[str]:
    if job.num_tasks > 1:
        return [str(job.task(t).paths.stdout) for t in range(job.num_tasks)]
    return [str(job.paths.stdout)]
