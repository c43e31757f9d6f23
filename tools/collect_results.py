"""Gather finished runs (their results.json) into one table: mean and spread per method over
seeds, overall and many/medium/few, as Markdown and CSV, plus a PNG bar chart.

    python tools/collect_results.py RUN_DIR_OR_PARENT [...] [--out PREFIX]

Runs are grouped by their config name with the seed removed (results.json "name" minus a
"_s<seed>" at the end or before a stage name), so "fmnist_lt_ce_s0" and "fmnist_lt_ce_s1"
form one row, and so do "p_s0/crt" and "p_s1/crt".
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys

COLUMNS = ("balanced_error", "many", "medium", "few", "top1")
HEADERS = {"balanced_error": "balanced error %", "many": "many acc %", "medium": "medium acc %",
           "few": "few acc %", "top1": "top-1 acc %"}


def find_results(paths: list[str]) -> list[dict]:
    found = []
    for p in paths:
        for dirpath, _, files in os.walk(p):
            if "results.json" in files:
                with open(os.path.join(dirpath, "results.json")) as f:
                    r = json.load(f)
                r["_dir"] = dirpath
                found.append(r)
    if not found:
        raise SystemExit(f"no results.json under {', '.join(paths)}")
    return found


def group_name(r: dict) -> str:
    return re.sub(r"_s\d+(?=/|$)", "", r.get("name", os.path.basename(r["_dir"])))


def summarize(results: list[dict]) -> list[dict]:
    """One row per group: mean and standard deviation (over seeds) of each column."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(group_name(r), []).append(r)
    rows = []
    for name, runs in groups.items():
        row = {"name": name, "seeds": len(runs)}
        for col in COLUMNS:
            vals = [r[col] for r in runs if r.get(col) is not None]
            row[col] = statistics.mean(vals) if vals else None
            row[col + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["balanced_error"] is None, -(r["balanced_error"] or 0)))


def _fmt(row, col) -> str:
    if row[col] is None:
        return "-"
    if row["seeds"] > 1:
        return f"{row[col]:.2f} ± {row[col + '_std']:.2f}"
    return f"{row[col]:.2f}"


def to_markdown(rows: list[dict]) -> str:
    head = "| run | seeds | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |"
    sep = "|---|---|" + "---|" * len(COLUMNS)
    body = [f"| {r['name']} | {r['seeds']} | " + " | ".join(_fmt(r, c) for c in COLUMNS) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def write_csv(rows: list[dict], path: str):
    cols = ["name", "seeds"] + [x for c in COLUMNS for x in (c, c + "_std")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in cols})


def plot(rows: list[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    splits = ["many", "medium", "few"]
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    err = [r["balanced_error"] for r in rows]
    a1.barh(x, err, xerr=[r["balanced_error_std"] for r in rows], color="tab:red", alpha=0.7)
    a1.set_yticks(x, [r["name"] for r in rows], fontsize=8)
    a1.set_xlabel("balanced test error (%)")
    width = 0.27
    for i, s in enumerate(splits):
        vals = [r[s] if r[s] is not None else 0 for r in rows]
        a2.barh(x + (i - 1) * width, vals, height=width, label=s)
    a2.set_yticks(x, [""] * len(rows))
    a2.set_xlabel("accuracy (%)")
    a2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders or folders that contain them")
    p.add_argument("--out", help="write PREFIX.md, PREFIX.csv and PREFIX.png")
    args = p.parse_args(argv)
    rows = summarize(find_results(args.paths))
    md = to_markdown(rows)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(md + "\n")
        write_csv(rows, args.out + ".csv")
        plot(rows, args.out + ".png")
        print(f"wrote {args.out}.md, .csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
