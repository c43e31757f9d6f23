"""Pseudo-label an unlabeled pool with any checkpoint of a run, sharded over DDP ranks.

    python tools/pseudo_label.py --run RUN [--checkpoint CKPT] [--out FILE.npz]
        [--threshold 0.9] [--top-k 500] [--probs] [--nproc N] [--batch-size B]
        [--set semi.rho_u=1 semi.pool_file=DIR/pool.json ...]

The pool is the one RUN/config.yaml's `semi` section describes, changed by --set (e.g. a pool
written by tools/make_unlabeled_pool.py). The output (default RUN/pseudo_labels.npz) holds hard
labels, confidences, the selection (--threshold, --top-k per class) and, with --probs, the
probability vectors; a self_training run reads it through semi.pseudo_labels=FILE with the same
semi keys. The accuracy of the labels against the pool's hidden labels is printed per class.
Under torchrun, or with --nproc, the ranks share the pool; a killed run resumes its chunks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


from ltrainer.data_pipelines.sources import DataError  # noqa: E402
from ltrainer.trainer import distributed as dist_utils  # noqa: E402
from ltrainer.trainer import pseudo_labels  # noqa: E402
from ltrainer.trainer.config import ConfigError  # noqa: E402
from ltrainer.trainer.banks.files import BankError  # noqa: E402
from ltrainer.trainer.banks.label_pool import label_run  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (config.yaml + model_final.pt)")
    p.add_argument("--checkpoint", help="default RUN/model_final.pt; an unfinished run's\n"
                   "RUN/checkpoint_last.pt only when named here")
    p.add_argument("--out", help="output .npz; default RUN/pseudo_labels.npz")
    p.add_argument("--threshold", type=float, default=0.0, help="keep confidence >= this")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most confident per class")
    p.add_argument("--probs", action="store_true", help="also store the probability vectors")
    p.add_argument("--nproc", type=int, default=1, help="local DDP processes")
    p.add_argument("--batch-size", type=int, help="default data.eval_batch_size")
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", help="also write the accuracy report here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides choosing the pool, e.g. semi.rho_u=1")
    return p.parse_args(argv)


def label(json_path=None, **kwargs):
    """One rank's share; rank 0 prints (and saves) the report."""
    report = label_run(**kwargs)
    if report is not None:
        print(pseudo_labels.format_report(report))
        print(f"wrote {kwargs['out']}")
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.threshold < 1 or args.top_k < 0:
        print("error: --threshold must lie in [0, 1) and --top-k be >= 0", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run, pseudo_labels.FILE)
    kwargs = dict(json_path=args.json, run_dir=args.run, out=out, checkpoint=args.checkpoint,
                  overrides=args.set, threshold=args.threshold, top_k=args.top_k,
                  save_probs=args.probs, batch_size=args.batch_size, workers=args.workers,
                  device=args.device)
    try:
        dist_utils.run_local(label, args.nproc, kwargs)
        return 0
    except (BankError, DataError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
