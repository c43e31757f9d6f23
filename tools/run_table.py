"""Train a set of configs over several seeds, one after another, then print the table.

    python tools/run_table.py [--configs C1.yaml ...] [--seeds 0 1] [--out runs/table] [key=value ...]

The default is the README's Fashion-MNIST-LT table: CE, CB-CE, Focal, CE-DRW, CE-DRS and
LDAM-DRW at rho = 100. Each run is a separate process (a failure stops nothing else) and each is
resumable: re-running the command skips finished runs and continues unfinished ones.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools import collect_results  # noqa: E402

FMNIST_TABLE = ["fmnist_lt_ce", "fmnist_lt_cb_ce", "fmnist_lt_focal", "fmnist_lt_ce_drw",
                "fmnist_lt_ce_drs", "fmnist_lt_ldam_drw"]


def launch(config: str, overrides: list[str]) -> bool:
    """Train a config (or pipeline) in a fresh process, so a failure stops nothing else; quiet
    progress lines. True when it succeeded."""
    cmd = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), config,
           "engine.progress=lines", "engine.log_every=1000", *overrides]
    return subprocess.run(cmd).returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+",
                   default=[os.path.join(ROOT, "configs", n + ".yaml") for n in FMNIST_TABLE])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", default=os.path.join("runs", "table"))
    p.add_argument("overrides", nargs="*", help="applied to every run, e.g. sched.epochs=10")
    args = p.parse_args(argv)
    failed = []
    t0 = time.time()
    jobs = [(c, s) for s in args.seeds for c in args.configs]
    for i, (config, seed) in enumerate(jobs, 1):
        name = os.path.splitext(os.path.basename(config))[0] + f"_s{seed}"
        print(f"== [{i}/{len(jobs)}] {name} ({time.time() - t0:.0f}s elapsed)", flush=True)
        if not launch(config, [f"run.seed={seed}", f"run.name={name}",
                               f"run.out_dir={args.out}", *args.overrides]):
            failed.append(name)
    print(f"== all runs done in {time.time() - t0:.0f}s")
    collect_results.main([args.out, "--out", os.path.join(args.out, "summary")])
    return exit_code(failed)


def exit_code(failed: list[str]) -> int:
    """1, naming the failed runs on stderr, when any failed; else 0."""
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
