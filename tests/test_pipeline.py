"""Multi-stage plans: loading, references between stages, dry runs, and resume inside a stage."""
import os
import signal
import textwrap

import pytest
import torch

from tests.conftest import ROOT, needs_fmnist, run_cli
from ltrainer.trainer.config import ConfigError
from ltrainer.trainer.pipeline import load_plan
from ltrainer.trainer.results import load_per_class

TRAIN = os.path.join(ROOT, "launchers", "train.py")
ROTATION = os.path.join(ROOT, "configs", "fmnist_lt_rotation_ldam_drw.yaml")


def test_plan_resolves_stages_references_and_stage_overrides(tmp_path):
    plan = load_plan(ROTATION, [f"run.out_dir={tmp_path}", "sched.epochs=1", "crt.sched.epochs=3"])
    assert [s.name for s in plan] == ["pretrain", "ldam_drw", "ce", "crt"]
    by = {s.name: s for s in plan}
    assert by["pretrain"].cfg.method.name == "rotation"
    assert by["ldam_drw"].cfg.model.init == os.path.join(by["pretrain"].run_dir, "model_final.pt")
    assert by["crt"].cfg.model.init == os.path.join(by["ce"].run_dir, "model_final.pt")
    assert by["crt"].cfg.sched.epochs == 3 and by["ce"].cfg.sched.epochs == 1
    assert by["ldam_drw"].run_dir == os.path.join(str(tmp_path), "fmnist_lt_rotation_ldam_drw",
                                                  "ldam_drw")


def test_run_name_override_renames_every_stage_folder(tmp_path):
    """run_table gives each seed its own run.name; the stages must follow it, or the second
    seed would find the first seed's finished stages and skip them."""
    plan = load_plan(ROTATION, [f"run.out_dir={tmp_path}", "run.name=rot_s1"])
    assert {os.path.dirname(s.run_dir) for s in plan} == {os.path.join(str(tmp_path), "rot_s1")}
    by = {s.name: s for s in plan}
    assert by["ce"].cfg.model.init == os.path.join(str(tmp_path), "rot_s1", "pretrain",
                                                   "model_final.pt")


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_plan_errors_name_the_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"stage 'b'.*unknown key 'optim.lrr'"):
        load_plan(write(tmp_path, """
            stages:
              - name: a
              - name: b
                optim: {lrr: 1}
        """))
    with pytest.raises(ConfigError, match=r"model.init = '@b' must name an earlier stage"):
        load_plan(write(tmp_path, """
            stages:
              - name: a
                model: {init: "@b"}
              - name: b
        """))
    with pytest.raises(ConfigError, match="also a config section"):
        load_plan(write(tmp_path, "stages:\n  - name: moco\n"))


@pytest.mark.parametrize("config", ["inat_moco_crt.yaml", "imagenet_lt_moco_crt.yaml"])
def test_dry_run_of_the_large_configs(tmp_path, config):
    path = os.path.join(ROOT, "configs", config)
    missing = run_cli(TRAIN, path, "--dry-run", check=False)
    assert missing.returncode == 2 and ("data.root is required" in missing.stderr or
                                        "LTRAINER_DATA is not set" in missing.stderr)
    lists = [tmp_path / f"{s}.txt" for s in ("train", "val", "test")]
    for f in lists:
        f.write_text("a/b.jpg 0\n")
    over = [f"data.train_list={lists[0]}", f"data.val_list={lists[1]}", f"data.test_list={lists[2]}"]
    absent = run_cli(TRAIN, path, "data.root=/no/such/root", *over, "--dry-run", check=False)
    assert absent.returncode == 2
    assert "data.root = '/no/such/root': folder not found" in absent.stderr
    # the paths exist, but the one-line lists leave every class but 0 without an image and the
    # root holds none of them: refused, after the plan is printed (issue 12 finding 3)
    bad = run_cli(TRAIN, path, f"data.root={tmp_path}", *over, "--dry-run", check=False)
    assert bad.returncode == 2 and "classes have no image" in bad.stderr
    assert "holds none of the" in bad.stderr
    for word in ("pretrain", "moco", "crt", "resnet50", "model_final.pt", "lr "):
        assert word in bad.stdout


@needs_fmnist
def test_pipeline_killed_in_stage_two_resumes_to_the_same_results(tiny, tmp_path):
    over = [o for o in tiny if not o.startswith("sched.")] + [
        "sched.epochs=2", "sched.warmup_epochs=0", "pretrain.sched.epochs=1",
        "crt.sched.epochs=1", "checkpoint.every_steps=5", "eval.every_epochs=0"]
    ref = over + [f"run.out_dir={tmp_path}/ref"]
    killed = over + [f"run.out_dir={tmp_path}/killed"]
    run_cli(TRAIN, ROTATION, *ref)
    # rotation pre-training takes 12 steps; the kill lands in stage 'ldam_drw' at its step 17
    proc = run_cli(TRAIN, ROTATION, *killed, env={"LTT_KILL_AT_STEP": "17"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "killed" / "fmnist_lt_rotation_ldam_drw"
    assert (root / "pretrain" / "results.json").exists()
    assert not (root / "ldam_drw" / "results.json").exists()
    again = run_cli(TRAIN, ROTATION, *killed)
    assert "this run is complete" in again.stdout and "resumed from" in again.stdout
    for stage in ("pretrain", "ldam_drw", "ce", "crt"):
        a = load_per_class(str(tmp_path / "ref" / "fmnist_lt_rotation_ldam_drw" / stage))
        b = load_per_class(str(root / stage))
        assert a["per_class_acc"].tolist() == b["per_class_acc"].tolist(), stage
        wa = torch.load(tmp_path / "ref" / "fmnist_lt_rotation_ldam_drw" / stage / "model_final.pt", weights_only=True)
        wb = torch.load(root / stage / "model_final.pt", weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage
