"""The engine end to end: outputs, exact resume after kills, DDP equivalence, AMP, errors."""
import json
import os
import signal

import pytest
import torch

from tests.conftest import ROOT, needs_fmnist, run_cli
from ltrainer.trainer.checkpoint import LAST, safe_load
from ltrainer.trainer.config import load_config
from ltrainer.trainer.results import confusion_matrix, load_per_class

pytestmark = needs_fmnist
CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")
TRAIN = os.path.join(ROOT, "launchers", "train.py")


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "model_final.pt"), weights_only=True)


def assert_same_weights(a, b, exact=True, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def test_run_writes_all_outputs_and_reports_completion(tiny, tmp_path):
    out = run_cli(TRAIN, CE, *tiny, "run.name=full")
    run = tmp_path / "full"
    for name in ("config.yaml", "metrics.jsonl", "results.json", "run.log", "model_final.pt",
                 "model_torchvision.pt", "per_class_accuracy.png", LAST):
        assert (run / name).exists(), name
    res = json.loads((run / "results.json").read_text())
    per_class = load_per_class(str(run))        # the per-class arrays sit beside it
    assert per_class["class_counts"].tolist() == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert len(per_class["per_class_acc"]) == 10 and confusion_matrix(per_class).shape == (10, 10)
    assert confusion_matrix(per_class).sum() == res["num_samples"]
    assert abs(res["balanced_error"] - (100 - per_class["per_class_acc"].sum() / 10)) < 1e-6
    assert res["many"] is None and res["few"] is not None        # no class above 100 images
    assert (run / "per_class_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "balanced error" in out.stdout and "img/s ETA" in out.stdout
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval_test"}
    again = run_cli(TRAIN, CE, *tiny, "run.name=full")
    assert "this run is complete" in again.stdout


@pytest.mark.parametrize("kills", [[6], [11, 12], [4, 20, 31]])
def test_killed_runs_resume_to_identical_weights(tiny, tmp_path, kills):
    """SIGKILL at mid-epoch steps, at an epoch's last step and just after it, several times in
    one run: re-running the command must give bit-identical final weights."""
    args = [TRAIN, CE, *tiny, "checkpoint.every_steps=4", "model.channels_last=true"]
    run_cli(*args, "run.name=ref")
    for k in kills:
        proc = run_cli(*args, "run.name=killed", env={"LTT_KILL_AT_STEP": str(k)}, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = run_cli(*args, "run.name=killed")
    assert "resumed from" in proc.stdout
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed"))
    ref = load_per_class(str(tmp_path / "ref"))
    res = load_per_class(str(tmp_path / "killed"))
    assert ref["per_class_acc"].tolist() == res["per_class_acc"].tolist()
    # the metrics log holds each step once, as in the uninterrupted run
    steps = lambda d: [json.loads(l)["step"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert steps("ref") == steps("killed")


def test_four_process_run_killed_resumes_to_identical_weights(tiny, tmp_path):
    """With more than 2 gloo ranks an all-reduce's summation order follows DDP's buckets, which
    DDP re-cuts in every new process; the engine's rank-ordered averaging (deterministic mode)
    keeps a resumed 4-process run bit-identical to an uninterrupted one."""
    args = [TRAIN, CE, "--nproc", "4", "--oversubscribe", *tiny, "checkpoint.every_steps=3",
            "sched.epochs=2"]   # 4 processes on this 2-core machine: asked for explicitly
    run_cli(*args, "run.name=ref")
    proc = run_cli(*args, "run.name=killed", env={"LTT_KILL_AT_STEP": "7"}, check=False)
    assert proc.returncode != 0
    assert "resumed from" in run_cli(*args, "run.name=killed").stdout
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed"))


def test_leftover_temp_file_and_corrupt_checkpoint(tiny, tmp_path):
    args = [TRAIN, CE, *tiny, "run.name=c", "checkpoint.every_steps=4"]
    run_cli(*args, env={"LTT_KILL_AT_STEP": "5"}, check=False)
    run = tmp_path / "c"
    (run / (LAST + ".tmp.999")).write_bytes(b"half-written")     # a save that was killed
    state = safe_load(str(run / LAST))
    assert state["progress"]["global_step"] == 4
    (run / LAST).write_bytes(b"garbage")
    proc = run_cli(*args, check=False)
    assert proc.returncode != 0 and "cannot be read as a checkpoint" in proc.stderr


@pytest.mark.parametrize("rule", ["none", "resample"])
def test_two_process_ddp_matches_one_process(tiny, tmp_path, rule):
    """Same global batch on 1 and 2 gloo processes: same weights up to float rounding of the
    gradient all-reduce. The MLP has no BatchNorm, whose per-process statistics would differ."""
    from ltrainer.launchers.train import launch
    over = tiny + ["model.name=mlp", f"train_rule.name={rule}", "train_rule.start_epoch=0"]
    one = launch(load_config(CE, over + ["run.name=one"]), nproc=1)["one"]
    two = launch(load_config(CE, over + ["run.name=two"]), nproc=2)["two"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"),
                        exact=False)
    assert abs(one["balanced_error"] - two["balanced_error"]) < 1.0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(tiny, tmp_path, amp):
    from ltrainer.trainer.engine import train
    cfg = load_config(CE, tiny + [f"engine.amp={amp}", "engine.max_steps=2", f"run.name={amp}",
                                  "model.name=resnet8", "loss.name=ldam", "model.head=cosine"])
    res = train(cfg)
    assert res["global_step"] == 2
    state = safe_load(str(tmp_path / amp / LAST))
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0          # GradScaler state is checkpointed


def test_cli_reports_config_and_data_errors(tmp_path):
    bad = run_cli(TRAIN, CE, "optim.lrr=0.1", check=False)
    assert bad.returncode == 2 and "did you mean 'optim.lr'" in bad.stderr
    missing = run_cli(TRAIN, CE, f"data.root={tmp_path}/nothing", f"run.out_dir={tmp_path}",
                      check=False)
    assert missing.returncode == 2 and "dataset-fashion-mnist" in missing.stderr


def test_stop_request_checkpoints_and_resumes_exactly(tiny, tmp_path):
    """A stop request (what SIGUSR2/SIGTERM or submitit's checkpoint() trigger) saves at the
    next step boundary and raises Preempted; running again ends with the uninterrupted weights."""
    from ltrainer.trainer import engine
    cfg = lambda name: load_config(CE, tiny + [f"run.name={name}", "model.name=mlp"])
    engine.train(cfg("ref"))
    trainer = engine.Trainer(cfg("stopped"))
    original = trainer.method.training_step

    def step_then_signal(model, batch, ctx):
        out = original(model, batch, ctx)
        if trainer.global_step == 7:
            os.kill(os.getpid(), signal.SIGUSR2)     # arrives in the middle of step 8
        return out
    trainer.method.training_step = step_then_signal
    engine.install_stop_signals()
    try:
        with pytest.raises(engine.Preempted):
            trainer.fit()
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        engine._STOP.clear()
    assert safe_load(str(tmp_path / "stopped" / LAST))["progress"]["global_step"] == 8
    engine.train(cfg("stopped"))
    assert_same_weights(final_weights(tmp_path / "ref"), final_weights(tmp_path / "stopped"))


def test_torch_compile_option_trains_like_eager(tiny, tmp_path):
    """model.compile=true goes through torch.compile (inductor on CPU) and learns the same."""
    from ltrainer.trainer.engine import train
    over = tiny + ["model.name=mlp", "engine.max_steps=3"]
    train(load_config(CE, over + ["run.name=eager"]))
    train(load_config(CE, over + ["run.name=compiled", "model.compile=true"]))
    assert_same_weights(final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled"),
                        exact=False, tol=1e-4)
