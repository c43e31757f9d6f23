"""The paper's Table 1 (CE and LDAM-DRW, alone and + D_U, for each rho_U) and a relevance curve in
the shape of its Figure 2, measured with the self-training pipelines.

    python tools/run_semi_table.py [--seeds 0] [--rho-u 1 rho/2 rho 2rho]
        [--relevance 0 0.2 0.4 0.6 0.8 1] [--no-relevance] [--out runs/semi_table]
        [--config configs/fmnist_lt_self_training.yaml]
        [--relevance-config configs/fmnist5_lt_relevance.yaml] [--jobs 2] [key=value ...]

Each cell runs the pipeline labels -> pseudo -> both with semi.rho_u (or semi.relevance) set;
the 'labels' stage of one method and seed is shared by its cells (its folder is the same), so
it trains once and the other cells skip it. LDAM-DRW is the CE pipeline with loss.name=ldam,
model.head=cosine, train_rule.name=drw. Overrides apply to every run; `sched.*` ones go to the
training stages only (the pseudo-labelling stage has no schedule), so `sched.epochs=1` makes a
quick end-to-end check. Every run is resumable: re-running skips what is finished. Writes
OUT/semi_table.md (and .csv) and OUT/relevance.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ltrainer.tools import collect_results  # noqa: E402
from ltrainer.tools.run_table import exit_code, launch_all  # noqa: E402
from ltrainer.trainer.pipeline import load_plan  # noqa: E402

METHODS = {"CE": [], "LDAM-DRW": ["loss.name=ldam", "model.head=cosine", "train_rule.name=drw"]}
TRAINING_STAGES = ("labels", "both")
NO_POOL = "CE (no D_U)"    # the relevance task's labels-only baseline


def rho_u_values(tokens: list[str], rho: float) -> list[tuple[str, float]]:
    """'1', 'rho/2', 'rho', '2rho' or numbers -> (column label, value)."""
    named = {"rho": rho, "rho/2": rho / 2, "2rho": 2 * rho}
    out = []
    for t in tokens:
        value = named[t] if t in named else float(t)
        out.append((f"{value:g} ({t})" if t in named else f"{value:g}", value))
    return out


def stage_overrides(overrides: list[str]) -> list[str]:
    """`sched.*` -> the same for each training stage; the rest unchanged."""
    out = []
    for o in overrides:
        out += [f"{s}.{o}" for s in TRAINING_STAGES] if o.startswith("sched.") else [o]
    return out


def results_of(config: str, overrides: list[str]) -> dict:
    """{stage: results.json} of a finished pipeline run (stages without results left out)."""
    found = {}
    for stage in load_plan(config, overrides):
        path = os.path.join(stage.run_dir, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                found[stage.name] = json.load(f)
    return found


def cell_runs(out, tag, seed, method_over, semi_key, value, extra):
    """Overrides of one cell; its labels stage lives in a folder shared by the method's cells."""
    cell = os.path.join(out, f"{tag}_{semi_key}{value:g}_s{seed}")
    return [f"run.seed={seed}", f"run.out_dir={cell}",
            f"labels.run.out_dir={os.path.join(out, f'{tag}_labels_s{seed}')}",
            f"semi.{semi_key}={value}", *method_over, *extra]


def summarize(named: dict) -> dict:
    """{(name, seed): results} -> {name: mean/std row over seeds}, through collect_results."""
    rows = collect_results.summarize([{**r, "name": name, "_dir": ""}
                                      for (name, _), r in named.items()])
    return {r["name"]: r for r in rows}


def table1(rows: dict, columns: list[tuple[str, float]], size: float) -> str:
    head = "| method | " + " | ".join(f"rho_U = {c}" for c, _ in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for method in METHODS:
        base = rows.get(f"{method}")
        if base is None:
            continue
        lines.append(f"| {method} | {collect_results._fmt(base, 'balanced_error')} (no D_U) |"
                     + " |" * (len(columns) - 1))
        cells = [rows.get(f"{method} + D_U rho_U={c}") for c, _ in columns]
        lines.append(f"| {method} + D_U@{size:g}x | " + " | ".join(
            collect_results._fmt(r, "balanced_error") if r else "-" for r in cells) + " |")
    return "\n".join(lines)


def details(rows: dict, pseudo: dict) -> str:
    cols = ("balanced_error", "many", "medium", "few")
    lines = ["| run | seeds | " + " | ".join(collect_results.HEADERS[c] for c in cols)
             + " | pseudo-label acc % (balanced) |", "|---|---|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        acc = pseudo.get(name)
        lines.append(f"| {name} | {r['seeds']} | " + " | ".join(collect_results._fmt(r, c)
                                                               for c in cols)
                     + f" | {'-' if acc is None else f'{acc:.2f}'} |")
    return "\n".join(lines)


def plot_relevance(points: list[tuple[float, float, float]], baseline, path: str, title: str):
    """Balanced error against the pool's relevance ratio, the no-D_U baseline as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [100 * p[0] for p in points]
    ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                capsize=3, label="CE + D_U (self-training)")
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", linestyle="--", label="CE, no D_U")
    ax.set_xlabel("relevance ratio of D_U (%)")
    ax.set_ylabel("balanced test error (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config",
                   default=os.path.join(ROOT, "configs", "fmnist_lt_self_training.yaml"))
    p.add_argument("--relevance-config",
                   default=os.path.join(ROOT, "configs", "fmnist5_lt_relevance.yaml"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--rho-u", nargs="*", default=["1", "rho/2", "rho", "2rho"],
                   help="Table 1's columns; none (`--rho-u` alone): the relevance curve only")
    p.add_argument("--relevance", nargs="+", type=float, default=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--no-relevance", action="store_true", help="only Table 1")
    p.add_argument("--out", default=os.path.join("runs", "semi_table"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (see run_table.py)")
    p.add_argument("overrides", nargs="*", help="applied to every run, e.g. sched.epochs=1")
    args = p.parse_args(argv)
    extra = stage_overrides(args.overrides)
    first = load_plan(args.config, extra)[0].cfg
    columns = rho_u_values(args.rho_u, first.data.rho)
    jobs = []   # (kind, name, config, overrides)
    for seed in args.seeds:
        for method, over in METHODS.items():
            tag = method.lower().replace("-", "_")
            for col, value in columns:
                jobs.append(("table", (method, col), args.config,
                             cell_runs(args.out, tag, seed, over, "rho_u", value, extra)))
        if not args.no_relevance:
            for value in args.relevance:
                jobs.append(("relevance", value, args.relevance_config,
                             cell_runs(args.out, "relevance", seed, [], "relevance", value,
                                       extra)))
    t0 = time.time()
    runs = [(f"{kind} {key}", config, over) for kind, key, config, over in jobs]
    # Cells of one method share its 'labels' stage: the first cell of each group trains it,
    # then (in parallel with --jobs) the other cells, which find it finished.
    openers, seen = [], set()
    for run in runs:
        group = next(o for o in run[2] if o.startswith("labels.run.out_dir="))
        if group not in seen:
            seen.add(group)
            openers.append(run)
    rest = [r for r in runs if r not in openers]
    log_dir = os.path.join(args.out, "logs")
    failed = launch_all(openers, args.jobs, log_dir) + launch_all(rest, args.jobs, log_dir)
    print(f"== all runs done in {time.time() - t0:.0f}s")

    named, rel, pseudo_acc = {}, {}, {}   # keyed by (name, seed): a shared stage counts once
    for kind, key, config, over in jobs:
        res = results_of(config, over)
        method, col = key if kind == "table" else (NO_POOL, key)
        if "labels" in res:
            (named if kind == "table" else rel)[(method, res["labels"]["seed"])] = res["labels"]
        if "both" in res:
            name = (f"{method} + D_U rho_U={col}" if kind == "table"
                    else f"CE + D_U relevance={col:g}")
            (named if kind == "table" else rel)[(name, res["both"]["seed"])] = res["both"]
            rep = (res.get("pseudo") or {}).get("pseudo_labels") or {}
            pseudo_acc.setdefault(name, []).append(rep.get("balanced_accuracy"))
    rows = summarize(named)
    pseudo = {n: sum(v) / len(v) for n, v in pseudo_acc.items() if v and None not in v}
    size = first.semi.size
    os.makedirs(args.out, exist_ok=True)
    md = [f"Balanced test error (%), {first.data.source} rho = {first.data.rho:g}, "
          f"D_U@{size:g}x:", "", table1(rows, columns, size), "", details(rows, pseudo)] \
        if columns else []
    if rel:
        rel_rows = summarize(rel)
        pts = [(v, r["balanced_error"], r["balanced_error_std"]) for v in args.relevance
               for r in [rel_rows.get(f"CE + D_U relevance={v:g}")] if r]
        baseline = rel_rows[NO_POOL]["balanced_error"] if NO_POOL in rel_rows else None
        rcfg = load_plan(args.relevance_config, extra)[-1].cfg
        title = (f"{len(rcfg.data.classes or []) or 'all'}-class {rcfg.data.source}-LT, rho = "
                 f"{rcfg.data.rho:g}, D_U@{rcfg.semi.size:g}x, rho_U = {rcfg.semi.rho_u:g}")
        png = os.path.join(args.out, "relevance.png")
        plot_relevance(pts, baseline, png, title)
        md += ["", f"Relevance ({title}): balanced error (%) by share of relevant pool images", "",
               "| relevance % | " + " | ".join(f"{100 * v:g}" for v, _, _ in pts) + " | no D_U |",
               "|---|" + "---|" * (len(pts) + 1),
               "| CE + D_U | " + " | ".join(f"{e:.2f}" for _, e, _ in pts)
               + f" | {'-' if baseline is None else f'{baseline:.2f}'} |", "",
               f"![relevance]({png})"]
    text = "\n".join(md)
    print(text)
    with open(os.path.join(args.out, "semi_table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "semi_table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "seeds", "balanced_error", "many", "medium", "few", "pseudo_acc"])
        for name, r in rows.items():
            w.writerow([name, r["seeds"], r["balanced_error"], r["many"], r["medium"], r["few"],
                        pseudo.get(name)])
    print(f"wrote {args.out}/semi_table.md, .csv" + (" and relevance.png" if rel else ""))
    return exit_code(failed)


if __name__ == "__main__":
    sys.exit(main())
