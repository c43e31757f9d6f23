"""Run a config on this machine: one process, N local processes (gloo/NCCL), or under torchrun.

    python launchers/train.py CONFIG [section.key=value ...] [--nproc N]

The config is loaded and validated here, before any process starts. Re-running the same command
resumes the run from its last checkpoint (or reports it complete).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import ConfigError, load_config  # noqa: E402
from trainer import distributed as dist_utils  # noqa: E402


def _worker(local_rank: int, world: int, port: int, cfg, result_path: str | None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world))
    from trainer.engine import train
    results = train(cfg)
    if local_rank == 0 and result_path:
        with open(result_path, "w") as f:
            json.dump(results, f)


def launch(cfg, nproc: int = 1) -> dict:
    """Train `cfg` with `nproc` local processes; returns rank 0's results."""
    if nproc <= 1 or "RANK" in os.environ:  # one process, or torchrun started us
        from trainer.engine import train
        return train(cfg)
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.start_processes(_worker, args=(nproc, dist_utils.free_port(), cfg, out),
                           nprocs=nproc, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 data.rho=50")
    p.add_argument("--nproc", type=int, default=1, help="local processes (DDP)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from data_pipelines.sources import DataError
    try:
        results = launch(cfg, args.nproc)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # under torchrun, let rank 0 speak
        return 0
    shots = {k: results.get(k) for k in ("many", "medium", "few")}
    print(f"{cfg.run.name}: balanced error {results['balanced_error']:.2f}% "
          f"(many/medium/few accuracy {shots})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
