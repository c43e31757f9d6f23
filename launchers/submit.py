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
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ltrainer.launchers.train import USER_ERRORS, prepare, report_user_error  # noqa: E402
from trainer.config import ConfigError, resolve  # noqa: E402
from trainer.pipeline import check_world as check_world_of_plan, describe_plan  # noqa: E402

# variables of an enclosing torchrun/Slurm job that must not leak into the jobs we submit
LEAKY_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GLOO_SOCKET_IFNAME")
SWEEP_KEYS = {"configs", "seeds", "out_dir", "overrides", "slurm"}


class SubmitError(Exception):
    """A request the cluster cannot run (partition, nodes, GPUs...); raised before submitting."""


# --------------------------------------------------------------------------- settings

def slurm_settings(plan, args) -> dict:
    """The slurm section (the same in every stage: one allocation runs them all), with flags
    on top and the derived values filled in."""
    first = plan[0].cfg.slurm.to_dict()
    for stage in plan[1:]:
        if stage.cfg.slurm.to_dict() != first:
            raise ConfigError(f"stage '{stage.name}': slurm settings differ from stage "
                              f"'{plan[0].name}'; one job runs all stages, so set them once")
    s, origins = dict(first), {}
    for flag, key in (("nodes", "nodes"), ("gpus_per_node", "gpus_per_node"),
                      ("cpus_per_task", "cpus_per_task"), ("partition", "partition"),
                      ("timeout", "timeout_min"), ("mem", "mem_gb")):
        value = getattr(args, flag, None)
        if value is not None:
            s[key] = value
            origins[f"slurm.{key}"] = f"command line (--{flag.replace('_', '-')})"
    # type and range checks of the flags' values too
    s = resolve({"slurm": s}, origins).slurm.to_dict()
    s["tasks_per_node"] = max(1, s["gpus_per_node"])
    s["cpus_per_task_auto"] = not s["cpus_per_task"]
    if s["cpus_per_task_auto"]:
        s["workers"] = plan[0].cfg.data.workers
        s["cpus_per_task"] = default_cpus_per_task(s, node_cpus=None)
    s["world_size"] = s["nodes"] * s["tasks_per_node"]
    return s


# CPUs per GPU task when the node size is unknown (--local, or a partition without node
# info): 8 GPUs x 8 fit the common 64-CPU 8-GPU node.
DEFAULT_CPUS_PER_GPU = 8


def default_cpus_per_task(s: dict, node_cpus: int | None) -> int:
    """1 on CPU (one thread per rank); on GPUs data.workers + 1 (the loader's workers and the
    training thread), capped so that the node's GPU tasks fit its CPUs."""
    if not s["gpus_per_node"]:
        return 1
    cap = DEFAULT_CPUS_PER_GPU if node_cpus is None else node_cpus // s["tasks_per_node"]
    return max(1, min(s["workers"] + 1, cap))


def check_world(plan, s: dict):
    """What the engine would only find out on the nodes: the global batch must split evenly."""
    check_world_of_plan(plan, s["world_size"],
                        f"{s['nodes']} node(s) x {s['tasks_per_node']} task(s)")
    for stage in plan:
        if s["gpus_per_node"] == 0 and stage.cfg.engine.device == "cuda":
            raise ConfigError(f"stage '{stage.name}': engine.device = 'cuda' but no GPUs are "
                              f"requested; pass --gpus-per-node")


def _scontrol(*args) -> str:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise SubmitError((proc.stderr or proc.stdout).strip() or f"scontrol {' '.join(args)} failed")
    return proc.stdout


def _fields(line: str) -> dict:
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


def check_cluster(s: dict):
    """Refuse what the partition cannot run, instead of leaving a job pending forever."""
    if shutil.which("sbatch") is None:
        raise SubmitError("Slurm is not installed here (no sbatch on PATH); use --local to run "
                          "on this machine, or tools/local_slurm.sh up for a local cluster")
    parts = {}
    for line in _scontrol("show", "partition", "-o").splitlines():
        f = _fields(line)
        if "PartitionName" in f:
            parts[f["PartitionName"]] = f
    if not parts:
        raise SubmitError("the cluster has no partitions")
    name = s["partition"]
    if name is None:
        defaults = [p for p, f in parts.items() if f.get("Default") == "YES"]
        if not defaults:
            raise SubmitError(f"no default partition; pass --partition (one of {', '.join(parts)})")
        name = defaults[0]
    if name not in parts:
        raise SubmitError(f"partition '{name}' (--partition / slurm.partition) does not exist; partitions: {', '.join(sorted(parts))}")
    p = parts[name]
    if p.get("State", "UP") not in ("UP",):
        raise SubmitError(f"partition '{name}' is {p.get('State')}, not UP")
    total = int(p.get("TotalNodes", 0))
    if s["nodes"] > total:
        raise SubmitError(f"{s['nodes']} nodes (--nodes / slurm.nodes): partition '{name}' has "
                          f"only {total}")
    nodes = [_fields(l) for l in _scontrol("show", "node", p.get("Nodes", ""), "-o").splitlines()
             if l.strip()] if p.get("Nodes") else []
    if s.get("cpus_per_task_auto") and nodes:
        s["cpus_per_task"] = default_cpus_per_task(s, _node_cpus(nodes, s))
    need_cpus = s["cpus_per_task"] * s["tasks_per_node"]
    fit = [n for n in nodes if int(n.get("CPUTot", 0)) >= need_cpus]
    if nodes and len(fit) < s["nodes"]:
        most = max(int(n.get("CPUTot", 0)) for n in nodes)
        raise SubmitError(f"{s['tasks_per_node']} task(s) x {s['cpus_per_task']} CPU(s) per node "
                          f"(--cpus-per-task / slurm.cpus_per_task): "
                          f"only {len(fit)} node(s) of partition '{name}' have {need_cpus} CPUs "
                          f"(largest: {most})")
    if s["gpus_per_node"]:
        fit = [n for n in nodes if _gres_gpus(n) >= s["gpus_per_node"]]
        if len(fit) < s["nodes"]:
            raise SubmitError(f"{s['gpus_per_node']} GPUs per node (--gpus-per-node / "
                              f"slurm.gpus_per_node): only {len(fit)} node(s) of "
                              f"partition '{name}' have that many GPUs")
    limit = p.get("MaxTime", "UNLIMITED")
    if limit not in ("UNLIMITED", "INFINITE") and s["timeout_min"] > _minutes(limit):
        raise SubmitError(f"{s['timeout_min']} min (--timeout / slurm.timeout_min) exceeds partition '{name}' "
                          f"MaxTime {limit}")
    s["partition"] = name


def _node_cpus(nodes: list[dict], s: dict) -> int:
    """CPUs of the smallest node the job would need: the nodes-th largest among those with
    enough GPUs (all nodes when too few have them; the GPU check then refuses)."""
    with_gpus = [n for n in nodes if _gres_gpus(n) >= s["gpus_per_node"]] or nodes
    cpus = sorted((int(n.get("CPUTot", 0)) for n in with_gpus), reverse=True)
    return cpus[min(s["nodes"], len(cpus)) - 1]


def _gres_gpus(node: dict) -> int:
    m = re.search(r"gpu(?::[^:,(]+)?:(\d+)", node.get("Gres", ""))
    return int(m.group(1)) if m else 0


def _minutes(text: str) -> int:
    """Slurm time 'D-HH:MM:SS' / 'HH:MM:SS' / 'MM' -> minutes."""
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    else:
        parts = [0] * (3 - len(parts)) + parts
        minutes = parts[0] * 60 + parts[1] + (parts[2] > 0)
    return minutes + int(days or 0) * 1440


# --------------------------------------------------------------------------- submission

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


def _clean_env():
    """Jobs inherit this environment: drop an enclosing job's rank variables, and make the
    project importable wherever the job starts (the job object is unpickled there)."""
    for k in LEAKY_ENV:
        os.environ.pop(k, None)
    path = os.environ.get("PYTHONPATH", "")
    if ROOT not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = ROOT + (os.pathsep + path if path else "")


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
    from ltrainer.launchers.slurm_job import TrainJob
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


# --------------------------------------------------------------------------- following

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


def outcome_of(job):
    """('success', result) / ('error', trace) / (None, None) for one task, from its result file."""
    from submitit.core.utils import pickle_load
    path = job.paths.result_pickle
    if not path.exists():
        return None, None
    try:
        return pickle_load(path)
    except Exception:  # being written
        return None, None


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


def print_results(results: dict):
    for name, r in results.items():
        shots = " ".join(f"{k} {r[k]:.1f}" for k in ("many", "medium", "few") if r.get(k) is not None)
        print(f"{name}: balanced error {r['balanced_error']:.2f}% (accuracy {shots})")


# --------------------------------------------------------------------------- sweeps

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
    _clean_env()
    from ltrainer.launchers.slurm_job import TrainJob
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


# --------------------------------------------------------------------------- main

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
    _clean_env()
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
