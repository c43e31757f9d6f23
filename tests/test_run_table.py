"""The table runners: runs in parallel, each in its own folder and log, then one summary."""
import os

import pytest

from tests.conftest import ROOT, needs_fmnist
from ltrainer.tools import run_table

pytestmark = needs_fmnist


def test_parallel_runs_have_their_own_folders_logs_and_one_summary(tiny, tmp_path):
    out = tmp_path / "table"
    over = [o for o in tiny if not o.startswith("run.out_dir=")]
    code = run_table.main(["--configs", os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"),
                           "--seeds", "0", "1", "--jobs", "2", "--out", str(out),
                           *over, "model.name=mlp", "sched.epochs=1", "sched.milestones=[]"])
    assert code == 0
    for seed in (0, 1):
        assert (out / f"fmnist_lt_ce_s{seed}" / "results.json").is_file()
        log = (out / "logs" / f"fmnist_lt_ce_s{seed}.log").read_text()
        assert "engine.threads" not in log and "balanced error" in log
        assert f"run.seed={seed}" not in log   # the log is the run's own output
    summary = (out / "summary.md").read_text()
    assert "| fmnist_lt_ce | 2 |" in summary


def test_a_failed_run_is_named_and_the_others_finish(tiny, tmp_path, capsys):
    out = tmp_path / "table"
    over = [o for o in tiny if not o.startswith("run.out_dir=")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: " + os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")
                   + "\noptim: {lr: -1}\n")
    code = run_table.main(["--configs", str(bad), os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"),
                           "--seeds", "0", "--jobs", "2", "--out", str(out),
                           *over, "model.name=mlp", "sched.epochs=1", "sched.milestones=[]"])
    assert code == 1
    assert "failed: bad_s0" in capsys.readouterr().err
    assert (out / "fmnist_lt_ce_s0" / "results.json").is_file()


def test_semi_table_runs_its_cells_and_writes_table_and_curve(tiny, tmp_path):
    from ltrainer.tools import run_semi_table

    out = tmp_path / "semi"
    over = [o for o in tiny if not o.startswith(("run.out_dir=", "sched."))]
    code = run_semi_table.main([*over, "model.name=mlp", "sched.epochs=1",
                                "sched.warmup_epochs=0", "sched.milestones=[]",
                                "--out", str(out), "--jobs", "2", "--rho-u", "1", "rho",
                                "--relevance", "0.5"])
    assert code == 0
    table = (out / "semi_table.md").read_text()
    assert "| CE + D_U@4x |" in table and "| LDAM-DRW + D_U@4x |" in table
    assert "rho_U = 10 (rho)" in table and "| CE + D_U | " in table
    assert (out / "relevance.png").read_bytes()[:4] == b"\x89PNG"
    # the labels stage of a method trained once and was shared by its two cells
    assert len(list(out.glob("ce_labels_s0/*/labels/results.json"))) == 1
    assert len(list(out.glob("ce_rho_u*_s0/*/both/results.json"))) == 2
    # `--rho-u` with no value: the relevance curve alone (its cells are finished: collected)
    assert run_semi_table.main([*over, "model.name=mlp", "sched.epochs=1",
                                "sched.warmup_epochs=0", "sched.milestones=[]",
                                "--out", str(out), "--rho-u", "--relevance", "0.5"]) == 0
    table = (out / "semi_table.md").read_text()
    assert "D_U@4x |" not in table and "| CE + D_U | " in table


def test_compare_runs_tells_a_difference_from_seed_noise(tmp_path, capsys):
    """tools/compare_runs.py: 2 standard errors of the difference of the means decide."""
    import json

    from ltrainer.tools import compare_runs

    errors = {"a_s0": 20.0, "a_s1": 21.0, "a_s2": 22.0,      # mean 21, std 1
              "b_s0": 30.0, "b_s1": 31.0, "b_s2": 32.0,      # mean 31: 10 points away
              "c_s0": 21.5, "c_s1": 22.5, "c_s2": 20.5}      # mean 21.5: within noise of a
    for name, err in errors.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"name": name, "balanced_error": err, "seed": int(name[-1])}))
    assert compare_runs.main([str(tmp_path), "--pair", "a", "b", "--pair", "a", "c",
                              "--pair", "b", "a"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == ["A lower", "within noise", "A higher"]
    assert "-10.00" in rows[0] and "21.00 ± 1.00 (3)" in rows[0]
    assert compare_runs.main([str(tmp_path), "--pair", str(tmp_path / "a_s*"),
                              str(tmp_path / "b_s*")]) == 0               # groups as globs
    assert capsys.readouterr().out.strip().splitlines()[2].endswith("| A lower |")
    # paired by seed: c - a = +1.5, +1.5, -1.5: mean +0.5, SE 1.0 -> within noise; b - a = +10
    # every seed (no spread): beyond any noise
    assert compare_runs.main([str(tmp_path), "--paired", "--pair", "c", "a", "--pair", "b",
                              "a"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert "+1.50, +1.50, -1.50 (seeds 0, 1, 2) | +0.50 | 2.00 | within noise" in rows[0]
    assert rows[1].endswith("| +10.00 | 0.00 | A higher |")
    c = compare_runs.compare({"x": [1.0, 2.0, 3.0], "y": [5.0]}, "x", "y")   # y borrows x's std
    assert c["std_b"] == 1.0 and abs(c["se"] - (1 / 3 + 1) ** 0.5) < 1e-12
    with pytest.raises(SystemExit, match="no runs of group 'z'"):
        compare_runs.compare({"x": [1.0]}, "x", "z")
