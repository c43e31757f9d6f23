"""What the cluster can run, asked before anything is submitted: the slurm settings of a plan
(its `slurm:` section with submit.py's flags on top), the ranks they make against every
stage's batch, and the partition's nodes, CPUs, GPUs and time limit from `scontrol`."""
from __future__ import annotations

import re
import shutil
import subprocess

from ltrainer.trainer.config import ConfigError, resolve
from ltrainer.trainer.pipeline import check_world as check_world_of_plan

class SubmitError(Exception):
    """A request the cluster cannot run (partition, nodes, GPUs...); raised before submitting."""


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
