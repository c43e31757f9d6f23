"""Run a config on Slurm through submitit, one task per GPU (NCCL) or per node on CPU (gloo).

    python launchers/submit.py [--nodes N] [--gpus-per-node G] [--cpus-per-task C]
                               [--partition P] [--timeout MIN] [--mem GB] [--local]
                               [--dry-run] [--follow] CONFIG [section.key=value ...]
    python launchers/submit.py --sweep SWEEP.yaml [--follow] [flags] [section.key=value ...]

Everything is checked before anything is submitted: the config (unknown keys, types, rules),
the data paths, and the request against the cluster (the partition exists and has that many
nodes, GPUs and CPUs). Slurm settings may also live in the config's `slurm:` section; flags win.

The job (launchers/slurm_job.py) survives preemption, time limits and node failures: it saves at
the next step boundary and is requeued, and the requeued attempt resumes the right stage at the
right step (finished stages are skipped). Output: the run folder (results.json per stage,
run.log, ranks.jsonl with one line per rank and attempt) and submitit's per-task logs under
RUN_FOLDER/slurm/<submission>/. --follow prints rank 0's progress until the job ends and exits
non-zero if it failed. --local runs the same job on this machine without Slurm.

A sweep file lists configs x seeds (see configs/sweeps/fmnist_sweep.yaml); it is submitted as
one job array, and tools/collect_results.py turns the finished runs into a table (--follow
does that at the end).

This file is the command line; the jobs are done by slurm_cluster.py (settings, scontrol
checks), slurm_submission.py (executors, submitting), slurm_follow.py (log tail, outcomes),
slurm_sweep.py (sweep files), slurm_job.py (the job object) and slurm_task.py (inside a task).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ltrainer.launchers.slurm_cluster import SubmitError, check_cluster, check_world, slurm_settings
from ltrainer.launchers.slurm_follow import LogTail, wait_jobs
from ltrainer.launchers.slurm_submission import clean_env, submit_plan, task_logs
from ltrainer.launchers.slurm_sweep import submit_sweep
from ltrainer.launchers.train import USER_ERRORS, prepare, print_results, report_user_error
from ltrainer.trainer.pipeline import describe_plan


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (not with --sweep)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 slurm.qos=high")
    p.add_argument("--nodes", type=int, help="nodes (slurm.nodes; default 1)")
    p.add_argument("--gpus-per-node", dest="gpus_per_node", type=int,
                   help="GPUs per node, one task (rank) each; 0 = CPU, one task per node")
    p.add_argument("--cpus-per-task", dest="cpus_per_task", type=int,
                   help="CPUs (torch threads) per task; default 1 on CPU, data.workers+1 on GPU "
                        "capped to the node's CPUs / GPUs (8 when unknown)")
    p.add_argument("--partition", help="default: the cluster's default partition")
    p.add_argument("--timeout", type=int, help="minutes per attempt")
    p.add_argument("--mem", type=float, help="GB per node")
    p.add_argument("--local", action="store_true", help="run the same job here, without Slurm")
    p.add_argument("--dry-run", action="store_true", help="validate everything, submit nothing")
    p.add_argument("--follow", action="store_true",
                   help="print rank 0's progress until the job ends; exit 1 if it failed")
    p.add_argument("--sweep", help="a sweep file: configs x seeds as one job array")
    p.add_argument("--out", help="sweeps: output folder (default: the sweep file's out_dir)")
    args = p.parse_args(argv)
    if args.sweep and args.config:
        args.overrides = [args.config] + args.overrides  # with --sweep every positional is an override
        args.config = None
    if not args.sweep and not args.config:
        p.error("give a CONFIG or --sweep SWEEP.yaml")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.sweep:
            return submit_sweep(args)
        plan = prepare(args.config, args.overrides, dry_run=args.dry_run)   # --dry-run: the plan
        s = slurm_settings(plan, args)
        if not args.local:
            check_cluster(s)
        check_world(plan, s)
    except (*USER_ERRORS, SubmitError) as e:
        return report_user_error(e, {**USER_ERRORS, SubmitError: "cluster error"})
    where = "this machine (--local)" if args.local else f"partition '{s['partition']}'"
    if not args.dry_run:   # prepare printed it, with the batches, lrs and steps
        print(describe_plan(plan))
    print(f"{s['nodes']} node(s) x {s['tasks_per_node']} task(s) ({s['world_size']} ranks, "
          f"{'NCCL' if s['gpus_per_node'] else 'gloo'}), {s['cpus_per_task']} CPU(s) per task, "
          f"{s['timeout_min']} min per attempt, on {where}")
    if args.dry_run:
        print("dry run: config, data paths and the cluster request are valid; nothing submitted")
        return 0
    clean_env()
    job, record = submit_plan(plan, s, args.local)
    logs = task_logs(job)
    print(f"job id: {record['job_id']}")
    print(f"run folder: {record['run_root']}")
    print(f"submitit folder: {record['folder']}")
    print(f"rank 0 log: {logs[0]}")
    if len(logs) > 1:
        print(f"per-rank logs: {os.path.join(record['folder'], record['job_id'] + '_<rank>_log.out')}"
              f" (and .err)")
    print(f"ranks: {os.path.join(record['run_root'], 'ranks.jsonl')}")
    sys.stdout.flush()
    if not args.follow:
        return 0
    tail = LogTail(plan)
    ok, message = wait_jobs([job], tick=tail.poll)[str(job.job_id)]
    if not ok:
        print(f"job {job.job_id} failed: {message}", file=sys.stderr)
        return 1
    results = {}
    for stage in plan:
        path = os.path.join(stage.run_dir, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                results[stage.name] = json.load(f)
    print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
