"""Two runs' representations side by side (e.g. CE without and with self-supervised
pre-training): faiss kNN accuracy of their features (overall, balanced, many/medium/few), how
far tail-class test samples fall among head-class training samples (the paper's "leakage"),
and a t-SNE of both, as one Markdown report and one PNG.

    python tools/inspect_pair.py RUN_A RUN_B --names CE "CE + MoCo" --out docs/inspect

Writes OUT.md and OUT_tsne.png. Feature banks are extracted on first use and cached in each
run folder (tools/feature_bank.py does the same one measurement at a time).
"""
from __future__ import annotations

import argparse
import os
import sys


from ltrainer.tools import tsne  # noqa: E402
from ltrainer.trainer.banks import analysis as bank_analysis  # noqa: E402
from ltrainer.trainer.banks import extract as bank_extract  # noqa: E402
from ltrainer.trainer.banks import search as bank_search  # noqa: E402


def measure(run: str, k_knn: int, k_leak: int) -> tuple[dict, dict]:
    """(kNN result, leakage report) of a run's test features against its train features."""
    test, train = bank_extract.run_bank(run, "test"), bank_extract.run_bank(run, "train")
    return bank_search.knn_evaluate(test, train, k=k_knn), bank_analysis.leakage_report(test, train, k=k_leak)


def mean_of(report: dict, key: str) -> float:
    vals = [v[key] for v in report["per_class"].values() if v.get(key) is not None]
    return 100 * sum(vals) / len(vals)


def markdown(names, runs, results, k_knn, k_leak) -> str:
    lines = [f"kNN on the test split against the long-tailed train split (cosine, k = {k_knn}, "
             f"weighted vote), accuracy %:", "",
             "| model | top-1 | balanced | many | medium | few |", "|---|---|---|---|---|---|"]
    for name, (knn, _) in zip(names, results):
        lines.append(f"| {name} | " + " | ".join(
            "-" if knn[c] is None else f"{knn[c]:.2f}"
            for c in ("top1", "balanced_top1", "many", "medium", "few")) + " |")
    leak = results[0][1]
    lines += ["", f"Leakage of tail (few-shot) classes {bank_analysis.describe_ids(leak['tail'])} into head "
                  f"(many-shot) classes {bank_analysis.describe_ids(leak['head'])}, k = {k_leak}: share "
                  f"of a tail class's test samples whose neighbours are mostly head-class "
                  f"(leaked), and the mean share of own-class neighbours, %:", "",
              "| model | " + " | ".join(f"class {c} leaked / own" for c in leak["tail"])
              + " | mean leaked | mean own |",
              "|---|" + "---|" * (len(leak["tail"]) + 2)]
    for name, (_, rep) in zip(names, results):
        cells = ["-" if not v["samples"] else
                 f"{100 * v['leaked_share']:.1f} / {100 * v['own_class_neighbor_share']:.1f}"
                 for v in rep["per_class"].values()]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {mean_of(rep, 'leaked_share'):.1f}"
                     f" | {mean_of(rep, 'own_class_neighbor_share'):.1f} |")
    lines += ["", "Runs: " + ", ".join(f"{n} = `{r}`" for n, r in zip(names, runs))]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--names", nargs=2, default=["A", "B"])
    p.add_argument("--out", required=True, help="prefix of OUT.md and OUT_tsne.png")
    p.add_argument("--k-knn", type=int, default=20)
    p.add_argument("--k-leak", type=int, default=10)
    p.add_argument("--max-points", type=int, default=3000, help="t-SNE points per split")
    p.add_argument("--tsne", nargs=argparse.REMAINDER, default=[],
                   help="further tools/tsne.py options, e.g. --tsne --iters 500 --perplexity 20")
    args = p.parse_args(argv)
    runs = [args.run_a, args.run_b]
    try:
        results = [measure(r, args.k_knn, args.k_leak) for r in runs]
    except tsne.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    text = markdown(args.names, runs, results, args.k_knn, args.k_leak)
    png = args.out + "_tsne.png"
    code = tsne.main(["compare", *runs, "--names", *args.names, "--out", png,
                      "--max-train", str(args.max_points), "--max-test", str(args.max_points),
                      *args.tsne])
    if code:
        return code
    text += f"\n\n![t-SNE]({os.path.basename(png)})\n"
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
