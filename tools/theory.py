"""Monte Carlo checks of the paper's three theorems on its Gaussian models (Sections 2-3).

    python tools/theory.py all --out theory/ [--trials 20000] [--seed 0]
    python tools/theory.py t1|t2|t3 --out theory/

Each theorem prints a table (simulation next to the bound, and whether the bound held) and
writes a PNG; the exit status is 1 if any bound failed beyond Monte Carlo noise (3 standard
errors). Samples are drawn through exact sufficient statistics (binomial counts, Gaussian
and chi-square means), so 10^4-10^5 trials take seconds; tests check those shortcuts against
sample-by-sample simulation.

Theorem 1's probability as printed in the paper text we have reads "(n+ + n-)/(n- + n+)" in
the first exponent, which is 1 and cannot be what is meant ("maximized when n+ = n-").
Re-deriving it (Gaussian tail of the noise mean, Hoeffding for the two label-noise means,
delta/3 each) gives n+ n- / (n+ + n-), which is what we use.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass


import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

Z = 3.0  # Monte Carlo slack in standard errors when checking a probability bound


def mc_holds(p_emp: float, bound: float, trials: int) -> bool:
    """p_emp >= bound, up to Z standard errors of a frequency from `trials` draws."""
    se = math.sqrt(max(p_emp * (1 - p_emp), 1.0 / trials) / trials)
    return p_emp >= bound - Z * se


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(x) for c, x in zip(r, w)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * x for x in w), *lines[1:]])


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.2))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


# ============================================================================== Theorem 1

@dataclass
class T1:
    """Two Gaussians N(mu1, s^2), N(mu2, s^2); pseudo-labels right w.p. p (label +1) and q."""
    mu1: float = 1.0
    mu2: float = -1.0
    sigma: float = 1.0
    p: float = 0.95
    q: float = 0.75
    delta: float = 0.1

    @property
    def bias(self) -> float:
        """Where theta-hat concentrates, relative to the Bayes threshold (mu1+mu2)/2."""
        return (self.p - self.q) * (self.mu1 - self.mu2) / 2


def t1_bound(m: T1, n_pos: int, n_neg: int) -> float:
    """Theorem 1's lower bound on P(|theta-hat - (mu1+mu2)/2 - Delta(mu1-mu2)/2| <= delta)."""
    gap2 = (m.mu1 - m.mu2) ** 2
    fail = (2 * math.exp(-2 * m.delta ** 2 / (9 * m.sigma ** 2) * n_pos * n_neg / (n_pos + n_neg))
            + 2 * math.exp(-8 * n_pos * m.delta ** 2 / (9 * gap2))
            + 2 * math.exp(-8 * n_neg * m.delta ** 2 / (9 * gap2)))
    return max(0.0, 1.0 - fail)


def t1_estimates(m: T1, n_pos: int, n_neg: int, trials: int, rng, direct=False) -> np.ndarray:
    """theta-hat = (mean of pseudo-positives + mean of pseudo-negatives) / 2, per trial.

    A pseudo-positive is N(mu1) if its label is right (prob. p), else N(mu2): its mean is
    mu2 + (mu1-mu2) Binomial(n+, p)/n+ + sigma N(0,1)/sqrt(n+). `direct` draws every sample.
    """
    gap = m.mu1 - m.mu2
    if direct:
        right_p = rng.random((trials, n_pos)) < m.p
        right_n = rng.random((trials, n_neg)) < m.q
        xp = np.where(right_p, m.mu1, m.mu2) + m.sigma * rng.standard_normal((trials, n_pos))
        xn = np.where(right_n, m.mu2, m.mu1) + m.sigma * rng.standard_normal((trials, n_neg))
        return (xp.mean(1) + xn.mean(1)) / 2
    mean_p = m.mu2 + gap * rng.binomial(n_pos, m.p, trials) / n_pos \
        + m.sigma * rng.standard_normal(trials) / math.sqrt(n_pos)
    mean_n = m.mu1 - gap * rng.binomial(n_neg, m.q, trials) / n_neg \
        + m.sigma * rng.standard_normal(trials) / math.sqrt(n_neg)
    return (mean_p + mean_n) / 2


def t1_row(m: T1, n: int, rho_u: float, trials: int, rng) -> dict:
    """Unlabeled pool of n with imbalance rho_u = n- / n+ (the positive class is the minor)."""
    n_pos = max(1, round(n / (1 + rho_u)))
    n_neg = n - n_pos
    est = t1_estimates(m, n_pos, n_neg, trials, rng)
    dev = est - (m.mu1 + m.mu2) / 2
    p_emp = float(np.mean(np.abs(dev - m.bias) <= m.delta))
    bound = t1_bound(m, n_pos, n_neg)
    return {"n~": n, "rho_U": rho_u, "n+": n_pos, "n-": n_neg, "bias": m.bias,
            "mean shift": float(dev.mean()), "P(|err|<=d)": p_emp, "bound": bound,
            "holds": mc_holds(p_emp, bound, trials)}


def theorem1(out: str, trials: int = 20000, seed: int = 0, m: T1 | None = None,
             n_values=(100, 300, 1000, 3000, 10000, 30000, 100000),
             rho_values=(1, 2, 5, 10, 20, 50, 100), n_fixed: int = 20000):
    m = m or T1()
    rng = np.random.default_rng(seed)
    by_n = [t1_row(m, n, 1.0, trials, rng) for n in n_values]
    by_rho = [t1_row(m, n_fixed, r, trials, rng) for r in rho_values]
    cols = ["n~", "rho_U", "n+", "n-", "bias", "mean shift", "P(|err|<=d)", "bound", "holds"]
    text = (f"Theorem 1: mu1={m.mu1}, mu2={m.mu2}, sigma={m.sigma}, p={m.p}, q={m.q} "
            f"(Delta={m.p - m.q:.2f}), delta={m.delta}, {trials} trials per row.\n"
            f"theta-hat centres on (mu1+mu2)/2 + Delta(mu1-mu2)/2 ('bias'); the probability of "
            f"being within delta of it grows with n~ and falls with the unlabeled imbalance.\n\n"
            f"balanced unlabeled data, growing n~:\n{table(by_n, cols)}\n\n"
            f"n~ = {n_fixed}, growing imbalance rho_U = n- / n+:\n{table(by_rho, cols)}")
    fig, (a, b) = _figure(2)
    for ax, rows, key, log in ((a, by_n, "n~", True), (b, by_rho, "rho_U", True)):
        x = [r[key] for r in rows]
        ax.plot(x, [r["P(|err|<=d)"] for r in rows], "o-", label="simulated probability")
        ax.plot(x, [r["bound"] for r in rows], "s--", label="Theorem 1 lower bound")
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel("unlabeled samples n~ (balanced)" if key == "n~"
                      else f"unlabeled imbalance rho_U (n~ = {n_fixed})")
        ax.set_ylabel(f"P(|theta-hat - centre| <= {m.delta})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if key == "n~" else "lower left")
    fig.suptitle(f"Theorem 1: pseudo-labeled estimate of (mu1+mu2)/2 (p={m.p}, q={m.q})")
    fig.tight_layout()
    return _finish(out, "theorem1", text, fig, by_n + by_rho)


# ============================================================================== Theorem 2

def t2_error(c, p_pos: float, beta: float, sigma1: float = 1.0):
    """Error of sign(<theta, X> + b) with c = b / ||theta|| > 0, both classes zero-mean:
    p+ Phi(-c / s1) + p- Phi(c / (sqrt(beta) s1))."""
    c = np.asarray(c, dtype=np.float64)
    return p_pos * stats.norm.cdf(-c / sigma1) + (1 - p_pos) * stats.norm.cdf(
        c / (math.sqrt(beta) * sigma1))


def sample_t2(n: int, d: int, p_pos: float, beta: float, rng, sigma1: float = 1.0):
    """X | Y=+1 ~ N(0, s1^2 I), X | Y=-1 ~ N(0, beta s1^2 I); P(Y=+1) = p+."""
    y = np.where(rng.random(n) < p_pos, 1, -1)
    scale = np.where(y == 1, sigma1, math.sqrt(beta) * sigma1)
    return rng.standard_normal((n, d)) * scale[:, None], y


def t2_row(p_pos: float, beta: float, d: int, n: int, rng, directions: int = 8,
           offsets: int = 40) -> dict:
    """Many linear classifiers with b > 0 on one test sample: random directions times a grid
    of offsets, plus the offset that minimizes the exact error."""
    x, y = sample_t2(n, d, p_pos, beta, rng)
    grid = np.linspace(0.0, 4 * math.sqrt(beta), 2001)[1:]
    exact = t2_error(grid, p_pos, beta)
    best_c = float(grid[exact.argmin()])
    cs = np.concatenate([np.linspace(0.05, 3 * math.sqrt(beta), offsets), [best_c]])
    emp, gap = [], 0.0
    for _ in range(directions):
        theta = rng.standard_normal(d)
        proj = x @ (theta / np.linalg.norm(theta))
        for c in cs:
            e = float(np.mean(np.where(proj + c > 0, 1, -1) != y))
            emp.append((e, float(c)))
            gap = max(gap, abs(e - float(t2_error(c, p_pos, beta))))
    lo, lo_c = min(emp)
    return {"p+": p_pos, "beta": beta, "d": d, "classifiers": len(emp),
            "min exact err": float(exact.min()), "min simulated err": lo, "at b/|theta|": lo_c,
            "max |sim-exact|": gap, "bound": 0.25, "holds": mc_holds(lo, 0.25, n)}


def theorem2(out: str, trials: int = 20000, seed: int = 0, beta: float = 4.0,
             p_values=(0.5, 0.3, 0.1, 0.01), d_values=(2, 32)):
    rng = np.random.default_rng(seed)
    rows = [t2_row(p, beta, d, trials, rng) for p in p_values for d in d_values]
    text = (f"Theorem 2: X|Y=+1 ~ N(0, I), X|Y=-1 ~ N(0, {beta} I); every linear classifier "
            f"sign(<theta,X>+b), b>0, has error >= 1/4.\nEach row: random directions x offsets "
            f"on {trials} test points; 'min exact err' is the exact minimum over all b>0.\n\n"
            + table(rows, ["p+", "beta", "d", "classifiers", "min exact err",
                           "min simulated err", "at b/|theta|", "max |sim-exact|", "bound",
                           "holds"]))
    fig, (ax,) = _figure(1)
    c = np.linspace(0.01, 4 * math.sqrt(beta), 300)
    for p in p_values:
        ax.plot(c, t2_error(c, p, beta), label=f"p+ = {p}")
    ax.scatter([r["at b/|theta|"] for r in rows], [r["min simulated err"] for r in rows],
               marker="x", color="k", zorder=3, label="best simulated classifier (per row)")
    ax.axhline(0.25, color="red", linestyle="--", label="bound 1/4")
    ax.set_xlabel("b / ||theta||")
    ax.set_ylabel("error of sign(<theta, X> + b)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Theorem 2: linear classifiers on raw X (beta = {beta})")
    fig.tight_layout()
    return _finish(out, "theorem2", text, fig, rows)


# ============================================================================== Theorem 3

def t3_bound(d: int, beta: float, delta: float, p_pos: float) -> float:
    """Theorem 3's error bound for the classifier on Z = ||X||^2 (needs 0 < delta <
    (beta-1)/(beta+1)); the positive-class term is linear in the gap when delta is small."""
    if not 0 < delta < (beta - 1) / (beta + 1):
        raise ValueError(f"Theorem 3 needs 0 < delta < (beta-1)/(beta+1) = "
                         f"{(beta - 1) / (beta + 1):.3f}, got {delta}")
    g = beta - 1 - (1 + beta) * delta
    pos = math.exp(-d * g ** 2 / 32) if delta >= (beta - 3) / (beta + 1) else math.exp(-d * g / 16)
    return p_pos * pos + (1 - p_pos) * math.exp(-d * g ** 2 / (32 * beta ** 2))


def t3_guarantee(d: int, n_pos: int, n_neg: int, delta: float) -> float:
    return max(0.0, 1 - 2 * math.exp(-n_neg * d * delta ** 2 / 8)
               - 2 * math.exp(-n_pos * d * delta ** 2 / 8))


def t3_threshold(d: int, n_pos: int, n_neg: int, beta: float, trials: int, rng, direct=False):
    """b = (mean Z of the positives + mean Z of the negatives) / 2 from a training set, per
    trial. sum of n ||X||^2 / s^2 is chi-square with n d degrees of freedom."""
    if direct:
        zp = (rng.standard_normal((trials, n_pos, d)) ** 2).sum(2).mean(1)
        zn = beta * (rng.standard_normal((trials, n_neg, d)) ** 2).sum(2).mean(1)
    else:
        zp = rng.chisquare(n_pos * d, trials) / n_pos
        zn = beta * rng.chisquare(n_neg * d, trials) / n_neg
    return (zp + zn) / 2


def t3_error(b, d: int, beta: float, p_pos: float):
    """Exact error of sign(b - ||X||^2): positives have ||X||^2 ~ chi2_d, negatives beta chi2_d."""
    return p_pos * stats.chi2.sf(b, d) + (1 - p_pos) * stats.chi2.cdf(b / beta, d)


def t3_row(d: int, n_pos: int, n_neg: int, beta: float, delta: float, p_pos: float,
           trials: int, rng) -> dict:
    err = t3_error(t3_threshold(d, n_pos, n_neg, beta, trials, rng), d, beta, p_pos)
    bound, guar = t3_bound(d, beta, delta, p_pos), t3_guarantee(d, n_pos, n_neg, delta)
    p_emp = float(np.mean(err <= bound))
    raw = float(t2_error(np.linspace(1e-3, 4 * math.sqrt(beta), 4000), p_pos, beta).min())
    return {"d": d, "mean err": float(err.mean()), "95% err": float(np.quantile(err, 0.95)),
            "bound": bound, "P(err<=bound)": p_emp, "guaranteed P": guar,
            "best linear on X": raw, "holds": mc_holds(p_emp, guar, trials)}


def theorem3(out: str, trials: int = 20000, seed: int = 0, beta: float = 5.0,
             delta: float = 0.1, n_pos: int = 10, n_neg: int = 1000, p_pos: float = 0.5,
             d_values=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)):
    rng = np.random.default_rng(seed)
    rows = [t3_row(d, n_pos, n_neg, beta, delta, p_pos, trials, rng) for d in d_values]
    text = (f"Theorem 3: classifier sign(b - ||X||^2) with b from an imbalanced training set "
            f"(N+={n_pos}, N-={n_neg}), beta={beta}, delta={delta}; error on the test "
            f"distribution with p+={p_pos:.4g} (0.5 = balanced, as the paper evaluates), "
            f"{trials} trials per row.\nWith probability >= 'guaranteed P' the error is <= "
            f"'bound'; 'best linear on X' is Theorem 2's best b>0 classifier on raw X.\n\n"
            + table(rows, ["d", "mean err", "95% err", "bound", "P(err<=bound)",
                           "guaranteed P", "best linear on X", "holds"]))
    fig, (a, b) = _figure(2)
    d = [r["d"] for r in rows]
    a.plot(d, [r["mean err"] for r in rows], "o-", label="f_ss mean error (simulated)")
    a.plot(d, [r["95% err"] for r in rows], ":", label="f_ss 95th percentile")
    a.plot(d, [r["bound"] for r in rows], "s--", label="Theorem 3 bound")
    a.plot(d, [r["best linear on X"] for r in rows], "k-.", label="best linear on raw X")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("dimension d")
    a.set_ylabel("error")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    b.plot(d, [r["P(err<=bound)"] for r in rows], "o-", label="simulated P(err <= bound)")
    b.plot(d, [r["guaranteed P"] for r in rows], "s--", label="Theorem 3 guarantee")
    b.set_xscale("log")
    b.set_ylim(-0.02, 1.02)
    b.set_xlabel("dimension d")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.suptitle(f"Theorem 3: classifier on Z = ||X||^2 (N+={n_pos}, N-={n_neg}, "
                 f"beta={beta}, delta={delta})")
    fig.tight_layout()
    return _finish(out, "theorem3", text, fig, rows)


# ============================================================================== output

def _finish(out: str, name: str, text: str, fig, rows) -> dict:
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, f"{name}.png")
    fig.savefig(png, dpi=100)
    with open(os.path.join(out, f"{name}.txt"), "w") as f:
        f.write(text + "\n")
    print(text + f"\n-> {png}\n")
    return {"name": name, "rows": rows, "png": png, "text": text,
            "holds": all(r["holds"] for r in rows)}


THEOREMS = {"t1": theorem1, "t2": theorem2, "t3": theorem3}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("which", choices=[*THEOREMS, "all"])
    p.add_argument("--out", default="theory")
    p.add_argument("--trials", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = list(THEOREMS) if args.which == "all" else [args.which]
    results = [THEOREMS[n](args.out, trials=args.trials, seed=args.seed) for n in names]
    failed = [r["name"] for r in results if not r["holds"]]
    print("all bounds held" if not failed else f"bound violated in: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
