"""The paper's Gaussian models: simulation shortcuts equal direct simulation, closed forms equal
Monte Carlo, and every theorem's bound holds in its table; tables and PNGs are written."""
import math

import numpy as np
import pytest

from ltrainer.tools import theory


def close_in_distribution(a, b):
    """Same mean (within 5 standard errors) and standard deviation (within 10 %)."""
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 5 * se
    assert a.std() == pytest.approx(b.std(), rel=0.1)


def test_theorem1_shortcut_equals_direct_simulation():
    m = theory.T1(p=0.9, q=0.6, sigma=1.5)
    rng = np.random.default_rng(0)
    fast = theory.t1_estimates(m, 30, 70, 4000, rng)
    slow = theory.t1_estimates(m, 30, 70, 4000, rng, direct=True)
    close_in_distribution(fast, slow)
    assert fast.mean() == pytest.approx((m.mu1 + m.mu2) / 2 + m.bias, abs=0.02)


def test_theorem1_bound_grows_with_data_and_shrinks_with_imbalance():
    m = theory.T1()
    assert [theory.t1_bound(m, n, n) for n in (500, 2000, 8000)] == sorted(
        theory.t1_bound(m, n, n) for n in (500, 2000, 8000))
    assert theory.t1_bound(m, 10000, 10000) > theory.t1_bound(m, 2000, 18000) > \
        theory.t1_bound(m, 500, 19500)


def test_theorem2_closed_form_equals_simulation():
    rng = np.random.default_rng(1)
    x, y = theory.sample_t2(200000, 5, 0.3, 4.0, rng)
    theta = rng.standard_normal(5)
    for b in (0.2, 1.0, 3.0):
        pred = np.where(x @ theta + b > 0, 1, -1)
        assert np.mean(pred != y) == pytest.approx(
            float(theory.t2_error(b / np.linalg.norm(theta), 0.3, 4.0)), abs=0.005)
    c = np.linspace(1e-4, 50, 20000)
    for p in (0.5, 0.2, 0.01):
        for beta in (3.01, 5.0, 100.0):
            assert theory.t2_error(c, p, beta).min() >= 0.25  # the theorem, on a fine grid


def test_theorem3_shortcut_and_closed_form():
    rng = np.random.default_rng(2)
    fast = theory.t3_threshold(6, 4, 20, 5.0, 3000, rng)
    slow = theory.t3_threshold(6, 4, 20, 5.0, 3000, rng, direct=True)
    close_in_distribution(fast, slow)
    b, d, beta = 14.0, 6, 5.0
    x, y = theory.sample_t2(200000, d, 0.5, beta, rng)
    pred = np.where(b - (x ** 2).sum(1) > 0, 1, -1)
    assert np.mean(pred != y) == pytest.approx(float(theory.t3_error(b, d, beta, 0.5)), abs=0.005)
    with pytest.raises(ValueError, match="delta"):
        theory.t3_bound(10, 5.0, 0.7, 0.5)


def test_all_theorems_hold_and_write_tables_and_pngs(tmp_path, capsys):
    assert theory.main(["all", "--out", str(tmp_path), "--trials", "2000"]) == 0
    out = capsys.readouterr().out
    assert "all bounds held" in out and " NO" not in out
    for name in ("theorem1", "theorem2", "theorem3"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert "holds" in (tmp_path / f"{name}.txt").read_text()
    r1 = theory.theorem1(str(tmp_path), trials=2000, n_values=(100, 20000), rho_values=(1, 50),
                         n_fixed=20000)
    rows = {(r["n~"], r["rho_U"]): r for r in r1["rows"]}
    assert rows[(100, 1)]["P(|err|<=d)"] < rows[(20000, 1)]["P(|err|<=d)"]
    assert rows[(20000, 1)]["bound"] > rows[(20000, 50)]["bound"]
    assert all(r["mean shift"] == pytest.approx(r["bias"], abs=0.02) for r in r1["rows"])
    r3 = theory.theorem3(str(tmp_path), trials=2000, d_values=(5, 50, 500))
    errs = [r["mean err"] for r in r3["rows"]]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-6 < 0.25 <= r3["rows"][0][
        "best linear on X"]
