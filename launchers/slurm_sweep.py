"""Sweeps: a sweep file lists configs x seeds (configs/sweeps/fmnist_sweep.yaml), every cell
validated as a run, submitted as one job array per distinct slurm setting;
tools/collect_results.py tabulates the finished runs (--follow does it at the end)."""
from __future__ import annotations

import json
import os
import sys

from ltrainer.launchers.slurm_cluster import check_cluster, check_world, slurm_settings
from ltrainer.launchers.slurm_follow import wait_jobs
from ltrainer.launchers.slurm_job import TrainJob
from ltrainer.launchers.slurm_submission import (clean_env, make_executor, new_folder,
                                                 run_root_of, task_logs)
from ltrainer.launchers.train import prepare
from ltrainer.trainer.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # shipped configs' base

SWEEP_KEYS = {"configs", "seeds", "out_dir", "overrides", "slurm"}


def load_sweep(path: str, extra: list[str], out: str | None = None):
    """The cells (config, seed, plan) of a sweep file, all validated, and its output folder."""
    import yaml
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: sweep file not found")
    with open(path) as f:
        sweep = yaml.safe_load(f) or {}
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: expected a mapping with {', '.join(sorted(SWEEP_KEYS))}")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"valid: {', '.join(sorted(SWEEP_KEYS))}")
    configs, seeds = sweep.get("configs") or [], sweep.get("seeds") or [0]
    if not isinstance(configs, list) or not configs:
        raise ConfigError(f"{path}: 'configs' must be a non-empty list of config files")
    if not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds):
        raise ConfigError(f"{path}: 'seeds' must be a list of integers")
    out_dir = out or sweep.get("out_dir") or os.path.join(
        "runs", os.path.splitext(os.path.basename(path))[0])
    common = [f"slurm.{k}={json.dumps(v)}" for k, v in (sweep.get("slurm") or {}).items()]
    common += list(sweep.get("overrides") or []) + list(extra)
    cells, names = [], {}
    for cfg_path in configs:
        found = next((p for p in (cfg_path, os.path.join(ROOT, cfg_path)) if os.path.isfile(p)), cfg_path)
        base = prepare(found, common)  # to learn the run name
        name = base[0].cfg.run.name.split("/")[0]
        if name in names:
            raise ConfigError(f"{path}: {cfg_path} and {names[name]} both name their runs "
                              f"'{name}'; rows of the table would mix (set run.name)")
        names[name] = cfg_path
        for seed in seeds:
            cell_dir = os.path.join(out_dir, f"s{seed}")  # OUT/s<seed>/<run name>[/<stage>]
            plan = prepare(found, common + [f"run.seed={seed}", f"run.out_dir={cell_dir}"])
            cells.append((cfg_path, seed, plan))
    return cells, out_dir


def submit_sweep(args) -> int:
    cells, out_dir = load_sweep(args.sweep, args.overrides, args.out)
    groups: dict[str, list] = {}
    for cfg_path, seed, plan in cells:
        s = slurm_settings(plan, args)
        if not args.local:
            check_cluster(s)
        check_world(plan, s)
        groups.setdefault(json.dumps(s, sort_keys=True), []).append((cfg_path, seed, plan, s))
    print(f"sweep {args.sweep}: {len(cells)} runs ({len(groups)} job array(s)) in {os.path.abspath(out_dir)}")
    for cfg_path, seed, plan in cells:
        print(f"  {cfg_path} seed {seed}: {run_root_of(plan)}")
    if args.dry_run:
        print("dry run: configs, data paths and the cluster request are valid; nothing submitted")
        return 0
    clean_env()
    jobs, runs = [], []
    for members in groups.values():
        s = members[0][3]
        folder = new_folder(os.path.abspath(out_dir))
        ex = make_executor(folder, s, args.local, name=os.path.basename(os.path.abspath(out_dir)),
                           array=True)
        with ex.batch():
            batch = [ex.submit(TrainJob(plan, run_root_of(plan), signal_delay_s=s["signal_delay_s"],
                                        peer_failure_wait_s=s["peer_failure_wait_s"],
                                        local=args.local))
                     for _, _, plan, _ in members]
        for job, (cfg_path, seed, plan, _) in zip(batch, members):
            runs.append({"job_id": str(job.job_id), "config": cfg_path, "seed": seed,
                         "run_root": run_root_of(plan), "folder": folder,
                         "log": task_logs(job)[0]})
        jobs += batch
    with open(os.path.join(out_dir, "sweep_jobs.json"), "w") as f:
        json.dump(runs, f, indent=1)
    for r in runs:
        print(f"job {r['job_id']}: {r['config']} seed {r['seed']} -> {r['run_root']} (log {r['log']})")
    print(f"collect with: python tools/collect_results.py {os.path.abspath(out_dir)} "
          f"--out {os.path.join(os.path.abspath(out_dir), 'table')}")
    if not args.follow:
        return 0
    outcome = wait_jobs(jobs)
    bad = {j: m for j, (ok, m) in outcome.items() if not ok}
    for j, m in bad.items():
        print(f"job {j} failed: {m}", file=sys.stderr)
    from ltrainer.tools import collect_results
    try:
        collect_results.main([out_dir, "--out", os.path.join(out_dir, "table")])
    except SystemExit as e:  # no results at all
        print(e, file=sys.stderr)
        return 1
    return 1 if bad else 0
