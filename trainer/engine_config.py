"""The config sections the engine reads itself (run, engine, checkpoint, eval, dist), and the
`slurm` section that only launchers/submit.py reads: every config may carry it, and trainer
cannot import launchers, so it is declared here. Methods, losses, models, schedules,
optimizers and the data pipeline declare their own keys next to their code."""
from __future__ import annotations

import os

from ltrainer.configspec import F, Part
from ltrainer.data_pipelines.build import split_problem


def _check_run_name(cfg, fail):
    name = cfg.run.name
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
        fail("run.name", f"run.name = {name!r} must be a relative folder name inside "
                         f"run.out_dir (no absolute path, no '.', '..' or empty parts)")


RUN = Part({"run": {
    "name": F("str", "run", help="run folder name under out_dir"),
    "out_dir": F("str", "runs"),
    "seed": F("int", 0, ge=0),
    "deterministic": F("bool", False, help="torch deterministic algorithms"),
}}, _check_run_name, owner=__name__)


def _check_eval(cfg, fail):
    problem = split_problem(cfg, cfg.eval.split)
    if problem:
        fail("eval.split", f"eval.split = {cfg.eval.split!r}: {problem}")
    if cfg.eval.few > cfg.eval.many:
        fail("eval.few", f"eval.few = {cfg.eval.few} exceeds eval.many = {cfg.eval.many}")


ENGINE = Part({
    "engine": {
        "device": F("str", "auto", "auto", "cpu", "cuda"),
        "amp": F("str", "none", "none", "bf16", "fp16"),
        "threads": F("int", 0, ge=0, help="torch threads per process; 0 = OMP_NUM_THREADS, "
                                           "else SLURM_CPUS_PER_TASK, else cores / local ranks"),
        "log_every": F("int", 50, ge=1, help="steps between log lines"),
        "progress": F("str", "auto", "auto", "bar", "lines", "none"),
        "max_steps": F("int", 0, ge=0, help="stop after this many steps in total (smoke runs); "
                                            "0 = off"),
    },
    "checkpoint": {
        "every_steps": F("int", 0, ge=0, help="also save every N steps; 0 = each epoch only"),
    },
    "eval": {
        "every_epochs": F("int", 1, ge=0, help="0 = only at the end"),
        "split": F("str", "test", "test", "val", "train"),
        "many": F("int", 100, ge=0, help="many-shot: more than this many training images"),
        "few": F("int", 20, ge=0, help="few-shot: fewer than this many training images"),
    },
    "dist": {
        "backend": F("str", "auto", "auto", "gloo", "nccl"),
    },
    # Read only by launchers/submit.py (the engine ignores it); its flags override these.
    "slurm": {
        "partition": F("str", None, nullable=True, help="null = the cluster's default partition"),
        "nodes": F("int", 1, ge=1),
        "gpus_per_node": F("int", 0, ge=0, help="0 = CPU: one task per node; G: one task per "
                                                "GPU"),
        "cpus_per_task": F("int", 0, ge=0, help="0 = 1 on CPU (one thread per rank), else "
                                                "data.workers + 1 per GPU task, capped to the "
                                                "node's CPUs / GPUs (8 if unknown)"),
        "timeout_min": F("int", 60, ge=1, help="time limit of one attempt; requeues get a new "
                                               "one"),
        "mem_gb": F("float", None, nullable=True, gt=0, help="per node; null = partition "
                                                             "default"),
        "signal_delay_s": F("int", 90, ge=0, help="SIGUSR2 this long before the time limit: "
                                                  "time to reach a step boundary and save"),
        "max_num_timeout": F("int", 3, ge=0, help="requeues after time-outs (preemptions, node "
                                                  "failures do not count)"),
        "peer_failure_wait_s": F("int", 360, ge=0, help="when a peer rank dies, wait this long "
                                                        "for Slurm to requeue (over its "
                                                        "SlurmdTimeout)"),
        "account": F("str", None, nullable=True),
        "qos": F("str", None, nullable=True),
        "constraint": F("str", None, nullable=True),
        "job_name": F("str", None, nullable=True, help="null = the run name"),
        "array_parallelism": F("int", 256, ge=1, help="sweeps: array tasks running at once"),
        "setup": F("list", [], item="str", help="shell lines before srun (module load ...)"),
        "additional": F("any", None, nullable=True,
                        help="mapping of further sbatch options, e.g. {exclusive: true}"),
    },
}, _check_eval, owner=__name__)
