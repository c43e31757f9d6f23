"""Run a config on this machine: one process, N local processes (gloo/NCCL), or under torchrun.

    python launchers/train.py CONFIG [section.key=value | stage.section.key=value ...]
                              [--nproc N] [--dry-run]

A config with `stages:` runs its stages in order (see trainer/pipeline.py). Everything is loaded
and validated here, before any process starts; --dry-run stops after printing the plan and
checking that the data is on disk. Re-running the same command resumes where a run stopped
(trainer/run_folder.py: only with the same config; run.allow_change names what may differ).

SIGTERM or SIGUSR2 (to this process, any --nproc child, or a torchrun rank) makes every rank
checkpoint at the next step boundary. Exit status: 0 finished; 2 a config, data, run-folder or
disk error (one line on stderr); 143 stopped after writing that checkpoint (run it again).
"""
from __future__ import annotations

import argparse
import os
import sys


from ltrainer.data_pipelines.sources import DataError  # noqa: E402
from ltrainer.data_pipelines.unlabeled_pool import check_pool_paths  # noqa: E402
from ltrainer.launchers.plan_check import (DataProblems, check_plan_data, data_summary,  # noqa: E402
                                  describe_stages)
from ltrainer.trainer import distributed as dist_utils  # noqa: E402
from ltrainer.trainer.checkpoint import DiskError  # noqa: E402
from ltrainer.trainer.config import ConfigError  # noqa: E402
from ltrainer.trainer.divergence import Diverged  # noqa: E402
from ltrainer.trainer.engine import (STOP_EXIT_STATUS, STOP_SIGNALS, Preempted,  # noqa: E402
                            install_stop_signals)
from ltrainer.trainer.methods import METHODS  # noqa: E402
from ltrainer.trainer.pipeline import check_world, describe_plan, load_plan, run_plan  # noqa: E402
from ltrainer.trainer.run_folder import RunFolderError  # noqa: E402
from ltrainer.trainer.pseudo_labels import check_path as check_pseudo_labels  # noqa: E402
from ltrainer.trainer.transfer import check_init  # noqa: E402


class ReportedError(Exception):
    """A --nproc child printed a user error (one line) and exited with status 2."""


def _rank_main(plan) -> dict:
    """One rank of a --nproc run (trainer.distributed.run_local starts it): a stop or a user
    error becomes its exit status, which launch() turns back into Preempted / ReportedError."""
    install_stop_signals()
    try:
        return _run(plan)
    except Preempted:
        sys.exit(STOP_EXIT_STATUS)
    except tuple(USER_ERRORS) as e:
        sys.exit(report_user_error(e) if os.environ.get("RANK") == "0" else 2)


def _run(plan) -> dict:
    try:
        return run_plan(plan)
    finally:
        dist_utils.cleanup()


def launch(plan, nproc: int = 1) -> dict:
    """Run a plan (list of stages, or one Config) with `nproc` local processes; returns
    {stage name: results} of rank 0."""
    if not isinstance(plan, list):  # a single Config
        from ltrainer.trainer.pipeline import Stage
        plan = [Stage(plan.run.name, plan, os.path.join(plan.run.out_dir, plan.run.name))]
    if nproc <= 1 or "RANK" in os.environ:  # one process, or torchrun started us
        return _run(plan)
    import torch.multiprocessing as mp
    try:   # a stop asked of this launcher goes to every rank
        return dist_utils.run_local(_rank_main, nproc, {"plan": plan},
                                    forward_signals=STOP_SIGNALS)
    except mp.ProcessExitedException as e:
        if e.exit_code == STOP_EXIT_STATUS:
            raise Preempted(plan[-1].run_dir) from None
        if e.exit_code == 2:
            raise ReportedError() from None
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 data.rho=50")
    p.add_argument("--nproc", type=int, default=1, help="local processes (DDP)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow --nproc above this machine's cores (CPU) or GPUs")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the plan of stages, check the data paths, and stop")
    return p.parse_intermixed_args(argv)  # options may sit among the overrides


def prepare(config: str, overrides: list[str], dry_run: bool = False):
    """Load and check everything a run needs; raises ConfigError, or DataProblems with every
    data problem of every stage (the list files parsed and checked: launchers/plan_check.py).
    dry_run: print the plan (batch, lr used, steps, samples per epoch) first, even when the
    data are missing."""
    plan = load_plan(config, overrides)
    check_data(plan, dry_run)
    return plan


def check_data(plan, dry_run: bool = False):
    """The data part of prepare(): every list, pool and input file of every stage."""
    problems, reports = check_plan_data(plan)
    for i, stage in enumerate(plan):
        found = []
        if METHODS[stage.cfg.method.name].reads_pool:
            found += check_pool_paths(stage.cfg.semi)
        found += check_input_files(stage.cfg, [s.run_dir for s in plan[:i]])
        problems += [f"stage '{stage.name}': {p}" for p in found]
    if dry_run:
        print(describe_plan(plan))
        print(describe_stages(plan, reports))
        summary = data_summary(plan, reports)
        if summary:
            print(summary)
    if problems:
        raise DataProblems(problems)


class PeerDataProblems(Exception):
    """Rank 0 of this job found data problems (and printed them); this rank stops too."""


def check_data_once(config: str, overrides: list[str]):
    """Under torchrun (or one srun task per rank) every rank runs main(). Parsing and checking
    the lists is done by rank 0 alone (437,513 lines of iNat, once per job rather than once per
    GPU); the other ranks check the config, join the process group and learn rank 0's verdict,
    so every rank stops with exit status 2 on bad data instead of waiting for a peer that left."""
    rank, world = dist_utils.env_ranks()[:2]
    plan, problems = load_plan(config, overrides), None
    if rank == 0:
        try:
            check_data(plan)
        except DataProblems as e:
            problems = e
    if world > 1:
        cfg = plan[0].cfg
        dist_utils.setup(cfg.engine.device, cfg.dist.backend)   # run_plan reuses this group
        if dist_utils.any_rank(problems is not None):
            dist_utils.cleanup()
            if problems is None:
                raise PeerDataProblems()
    if problems is not None:
        raise problems
    return plan


def check_processes(plan, nproc: int, oversubscribe: bool = False):
    """--nproc against this machine, and every stage's batches against the number of ranks
    the run will have (--nproc, or the world torchrun / srun describe in the environment):
    refused here, before anything runs, not after an earlier stage has trained."""
    if nproc < 1:
        raise ConfigError(f"command line: --nproc {nproc} must be >= 1")
    import torch
    for stage in plan:   # this machine runs it: a GPU asked for must be here
        for key, value in (("engine.device", stage.cfg.engine.device),
                           ("data.dali_device", stage.cfg.data.dali_device)):
            if value in ("cuda", "gpu") and not torch.cuda.is_available():
                raise ConfigError(f"stage '{stage.name}': {key} = {value!r} but no CUDA device "
                                  f"is visible here")
    if nproc > 1 and "RANK" not in os.environ:   # launch() spawns nproc processes
        if not oversubscribe:
            gpus = (torch.cuda.device_count() if torch.cuda.is_available()
                    and plan[0].cfg.engine.device != "cpu" else 0)
            have, what = (gpus, "visible GPUs") if gpus else (len(os.sched_getaffinity(0)),
                                                               "CPU cores")
            if nproc > have:
                raise ConfigError(f"command line: --nproc {nproc} is more than the {have} "
                                  f"{what} here; pass --oversubscribe to run anyway")
        check_world(plan, nproc, f"--nproc {nproc}")
        return
    world = dist_utils.env_ranks()[1]
    how = ("WORLD_SIZE from torchrun" if "WORLD_SIZE" in os.environ else
           "the Slurm tasks of srun" if world > 1 else "one process")
    check_world(plan, world, how)


def check_input_files(cfg, earlier_dirs) -> list[str]:
    """Weights (model.init) and pseudo-labels (semi.pseudo_labels) that must exist before the
    run: read and checked now. Those an earlier stage of the plan writes ('@stage') are checked
    when the stage that reads them starts."""
    earlier = {os.path.abspath(d) for d in earlier_dirs}
    problems = []
    for value, check in ((cfg.model.init, check_init),
                         ((cfg.get("semi") or {}).get("pseudo_labels"), check_pseudo_labels)):
        path = os.path.abspath(value or "")
        if value and not {path, os.path.dirname(path)} & earlier:
            problems += check(value)
    return problems


# Bad input a user can fix: printed as one line naming its kind, exit status 2, no traceback.
USER_ERRORS = {ConfigError: "config error", DataError: "data error",
               RunFolderError: "run folder error", DiskError: "disk error",
               Diverged: "stopped"}   # "stopped: training diverged: loss ... lr ... batch"


def report_user_error(exc: Exception, kinds: dict = USER_ERRORS) -> int:
    kind = next(label for cls, label in kinds.items() if isinstance(exc, cls))
    for line in getattr(exc, "problems", None) or [exc]:   # DataProblems: one line each
        print(f"{kind}: {line}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    per_rank = "RANK" in os.environ and not args.dry_run   # torchrun / srun: one per rank
    try:
        if per_rank:
            plan = check_data_once(args.config, args.overrides)
        else:
            plan = prepare(args.config, args.overrides, args.dry_run)
        check_processes(plan, args.nproc, args.oversubscribe)
    except PeerDataProblems:
        print("data error: rank 0 found problems in the data (its output lists them)",
              file=sys.stderr)
        return 2
    except tuple(USER_ERRORS) as e:
        return report_user_error(e)
    if args.dry_run:
        print("dry run: config and data paths are valid")
        return 0
    install_stop_signals()   # one process and torchrun's ranks; --nproc children install theirs
    try:
        results = launch(plan, args.nproc)
    except (DataError, RunFolderError, DiskError, Diverged) as e:
        return report_user_error(e)
    except ReportedError:
        return 2
    except Preempted:
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped: checkpoint written; run the same command again to resume (exit "
                  f"status {STOP_EXIT_STATUS})", file=sys.stderr)
        return STOP_EXIT_STATUS
    if os.environ.get("RANK", "0") != "0":  # under torchrun, let rank 0 speak
        return 0
    print_results(results)
    return 0


def print_results(results: dict):
    """One line per stage: balanced error and the many / medium / few accuracies."""
    for name, r in results.items():
        shots = " ".join(f"{k} {r[k]:.1f}" for k in ("many", "medium", "few") if r.get(k) is not None)
        print(f"{name}: balanced error {r['balanced_error']:.2f}% (accuracy {shots})")


if __name__ == "__main__":
    sys.exit(main())
