"""Is run group A's balanced error different from B's beyond seed noise?

    python tools/compare_runs.py runs/fidelity_ssp runs/fidelity_semi \
        --pair fmnist_lt_baselines/ldam_drw fmnist_lt_baselines/ce [--pair A B ...]

Groups are collect_results.py's (config name with the seed removed, e.g. "fmnist_lt_ce" or
"fmnist_lt_baselines/crt"), or glob patterns of run folders (a group holding "*"), for runs
whose config names do not tell them apart (run_semi_table.py's cells, e.g.
"runs/fidelity_semi/ce_rho_u1_s*/*/both"). For each pair: mean +- std of each group over its seeds, the
difference A - B of the means, its standard error sqrt(sA^2/nA + sB^2/nB), and the verdict:
"A lower" / "A higher" when |difference| > 2 standard errors, else "within noise". With 3
seeds a side this is a rough screen (about a 95 % two-sided test if the spreads were known),
not a proof; a group with one seed has no spread of its own and borrows the other's.
`--paired`: the per-seed differences instead (seeds both groups ran), their mean and 2 standard
errors of it: the test to use when the two runs of a seed share a stage, as run_semi_table's
cells share their labels-stage model, so its seed-to-seed spread cancels.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys

from ltrainer.tools.collect_results import find_results, group_name


def verdict(diff: float, se: float) -> str:
    """Beyond 2 standard errors, or within noise."""
    return "within noise" if abs(diff) <= 2 * se else ("A lower" if diff < 0 else "A higher")


def compare(values: dict[str, list[float]], a: str, b: str) -> dict:
    """The pair's means, spreads, difference, standard error and verdict."""
    for g in (a, b):
        if g not in values:
            raise SystemExit(f"no runs of group {g!r}; groups found: {', '.join(sorted(values))}")
    va, vb = values[a], values[b]
    sa = statistics.stdev(va) if len(va) > 1 else None
    sb = statistics.stdev(vb) if len(vb) > 1 else None
    sa, sb = (sa if sa is not None else sb or 0.0), (sb if sb is not None else sa or 0.0)
    diff = statistics.mean(va) - statistics.mean(vb)
    se = math.sqrt(sa ** 2 / len(va) + sb ** 2 / len(vb))
    return {"a": a, "b": b, "mean_a": statistics.mean(va), "std_a": sa, "n_a": len(va),
            "mean_b": statistics.mean(vb), "std_b": sb, "n_b": len(vb), "diff": diff, "se": se,
            "verdict": verdict(diff, se)}


def compare_paired(seeded: dict[str, dict[int, float]], a: str, b: str) -> dict:
    """Mean and standard error of the per-seed differences A - B over the common seeds."""
    common = sorted(set(seeded.get(a, {})) & set(seeded.get(b, {})))
    if len(common) < 2:
        raise SystemExit(f"--paired: {a!r} and {b!r} share {len(common)} seed(s); need 2")
    d = [seeded[a][k] - seeded[b][k] for k in common]
    diff, se = statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))
    return {"a": a, "b": b, "seeds": common, "diffs": d, "diff": diff, "se": se,
            "verdict": verdict(diff, se)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", help="folders holding finished runs (results.json)")
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"))
    p.add_argument("--paired", action="store_true", help="per-seed differences (see above)")
    args = p.parse_args(argv)
    seeded: dict[str, dict[int, float]] = {}
    found = list(find_results(args.paths))
    for pattern in {g for pair in args.pair for g in pair if "*" in g}:
        for f in sorted(glob.glob(os.path.join(pattern, "results.json"))):
            with open(f) as fh:
                found.append({**json.load(fh), "_group": pattern})
    for r in found:
        if r.get("balanced_error") is not None:
            g = seeded.setdefault(r.get("_group") or group_name(r), {})
            g[int(r.get("seed", len(g)))] = float(r["balanced_error"])
    if args.paired:
        print("| A | B | per-seed A - B | mean | 2 SE | verdict |")
        print("|---|---|---|---|---|---|")
        for a, b in args.pair:
            c = compare_paired(seeded, a, b)
            diffs = ", ".join(f"{x:+.2f}" for x in c["diffs"])
            print(f"| {a} | {b} | {diffs} (seeds {', '.join(map(str, c['seeds']))}) | "
                  f"{c['diff']:+.2f} | {2 * c['se']:.2f} | {c['verdict']} |")
        return 0
    values = {g: list(v.values()) for g, v in seeded.items()}
    print("| A | B | A: balanced error % | B | A - B | 2 SE | verdict |")
    print("|---|---|---|---|---|---|---|")
    for a, b in args.pair:
        c = compare(values, a, b)
        print(f"| {a} | {b} | {c['mean_a']:.2f} ± {c['std_a']:.2f} ({c['n_a']}) | "
              f"{c['mean_b']:.2f} ± {c['std_b']:.2f} ({c['n_b']}) | {c['diff']:+.2f} | "
              f"{2 * c['se']:.2f} | {c['verdict']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
