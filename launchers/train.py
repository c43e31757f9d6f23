"""Run a config on this machine: one process, N local processes (gloo/NCCL), or under torchrun.

    python launchers/train.py CONFIG [section.key=value | stage.section.key=value ...]
                              [--nproc N] [--dry-run]

A config with `stages:` runs its stages in order (see trainer/pipeline.py). Everything is loaded
and validated here, before any process starts; --dry-run stops after printing the plan and
checking that the data is on disk. Re-running the same command resumes where a run stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines.build import check_data_paths  # noqa: E402
from data_pipelines.sources import DataError  # noqa: E402
from data_pipelines.unlabeled_pool import check_pool_paths  # noqa: E402
from trainer import distributed as dist_utils  # noqa: E402
from trainer.config import POOL_METHODS, ConfigError  # noqa: E402
from trainer.pipeline import describe_plan, load_plan, run_plan  # noqa: E402
from trainer.pseudo_labels import check_path as check_pseudo_labels  # noqa: E402
from trainer.transfer import check_init  # noqa: E402


def _worker(local_rank: int, world: int, port: int, plan, result_path: str | None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world))
    results = _run(plan)
    if local_rank == 0 and result_path:
        with open(result_path, "w") as f:
            json.dump(results, f)


def _run(plan) -> dict:
    try:
        return run_plan(plan)
    finally:
        dist_utils.cleanup()


def launch(plan, nproc: int = 1) -> dict:
    """Run a plan (list of stages, or one Config) with `nproc` local processes; returns
    {stage name: results} of rank 0."""
    if not isinstance(plan, list):  # a single Config
        from trainer.pipeline import Stage
        plan = [Stage(plan.run.name, plan, os.path.join(plan.run.out_dir, plan.run.name))]
    if nproc <= 1 or "RANK" in os.environ:  # one process, or torchrun started us
        return _run(plan)
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.start_processes(_worker, args=(nproc, dist_utils.free_port(), plan, out),
                           nprocs=nproc, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 data.rho=50")
    p.add_argument("--nproc", type=int, default=1, help="local processes (DDP)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the plan of stages, check the data paths, and stop")
    return p.parse_intermixed_args(argv)  # options may sit among the overrides


def prepare(config: str, overrides: list[str], dry_run: bool = False):
    """Load and check everything a run needs; raises ConfigError / DataError with the key."""
    plan = load_plan(config, overrides)
    for i, stage in enumerate(plan):
        problems = check_data_paths(stage.cfg.data)
        if stage.cfg.method.name in POOL_METHODS:
            problems += check_pool_paths(stage.cfg.semi)
        problems += check_input_files(stage.cfg, [s.run_dir for s in plan[:i]])
        if problems:
            raise DataError(f"stage '{stage.name}': " + "; ".join(problems))
    if dry_run:
        print(describe_plan(plan))
    return plan


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
USER_ERRORS = {ConfigError: "config error", DataError: "data error"}


def report_user_error(exc: Exception, kinds: dict = USER_ERRORS) -> int:
    kind = next(label for cls, label in kinds.items() if isinstance(exc, cls))
    print(f"{kind}: {exc}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = prepare(args.config, args.overrides, args.dry_run)
    except tuple(USER_ERRORS) as e:
        return report_user_error(e)
    if args.dry_run:
        print("dry run: config and data paths are valid")
        return 0
    try:
        results = launch(plan, args.nproc)
    except DataError as e:
        return report_user_error(e)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, let rank 0 speak
        return 0
    for name, r in results.items():
        shots = " ".join(f"{k} {r[k]:.1f}" for k in ("many", "medium", "few") if r.get(k) is not None)
        print(f"{name}: balanced error {r['balanced_error']:.2f}% (accuracy {shots})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
