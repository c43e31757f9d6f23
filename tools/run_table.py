"""Train a set of configs over several seeds, then print the table.

    python tools/run_table.py [--configs C1.yaml ...] [--seeds 0 1] [--out runs/table]
        [--jobs 2] [key=value ...]

The default is the README's Fashion-MNIST-LT table: CE, CB-CE, Focal, CE-DRW, CE-DRS and
LDAM-DRW at rho = 100. Each run is a separate process (a failure stops nothing else) and each is
resumable: re-running the command skips finished runs and continues unfinished ones.
`--jobs N` runs N at a time with cores/N torch threads each; each run's output then goes to
OUT/logs/NAME.log. Small models scale badly across threads: on 2 cores, two 1-thread ResNet-8
processes together train 1.59x the images/s of one 2-thread process (`tools/bench_threads.py`).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ltrainer.tools import collect_results  # noqa: E402

FMNIST_TABLE = ["fmnist_lt_ce", "fmnist_lt_cb_ce", "fmnist_lt_focal", "fmnist_lt_ce_drw",
                "fmnist_lt_ce_drs", "fmnist_lt_ldam_drw"]


def launch(config: str, overrides: list[str], log: str | None = None) -> bool:
    """Train a config (or pipeline) in a fresh process, so a failure stops nothing else; quiet
    progress lines, to `log` when given. True when it succeeded."""
    cmd = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), config,
           "engine.progress=lines", "engine.log_every=1000", *overrides]
    if log is None:
        return subprocess.run(cmd).returncode == 0
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode == 0


def launch_all(runs: list[tuple[str, str, list[str]]], jobs: int, log_dir: str) -> list[str]:
    """Run (name, config, overrides) triples, `jobs` at a time; the names of the failed ones.
    In parallel each process gets cores/jobs torch threads (unless engine.threads is given)."""
    t0, total = time.time(), len(runs)
    if jobs <= 1:
        failed = []
        for i, (name, config, over) in enumerate(runs, 1):
            print(f"== [{i}/{total}] {name} ({time.time() - t0:.0f}s elapsed)", flush=True)
            if not launch(config, over):
                failed.append(name)
        return failed
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def one(run):
        name, config, over = run
        if not any(o.startswith("engine.threads=") for o in over):
            over = [*over, f"engine.threads={threads}"]
        log = os.path.join(log_dir, re.sub(r"[^\w.=+-]+", "_", name) + ".log")
        print(f"== started {name} (log {log})", flush=True)
        ok = launch(config, over, log)
        print(f"== {'finished' if ok else 'FAILED'} {name} ({time.time() - t0:.0f}s elapsed)",
              flush=True)
        return None if ok else name

    with ThreadPoolExecutor(jobs) as pool:
        return [n for n in pool.map(one, runs) if n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+",
                   default=[os.path.join(ROOT, "configs", n + ".yaml") for n in FMNIST_TABLE])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", default=os.path.join("runs", "table"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("overrides", nargs="*", help="applied to every run, e.g. sched.epochs=10")
    args = p.parse_args(argv)
    t0 = time.time()
    runs = []
    for seed in args.seeds:
        for config in args.configs:
            name = os.path.splitext(os.path.basename(config))[0] + f"_s{seed}"
            runs.append((name, config, [f"run.seed={seed}", f"run.name={name}",
                                        f"run.out_dir={args.out}", *args.overrides]))
    failed = launch_all(runs, args.jobs, os.path.join(args.out, "logs"))
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
