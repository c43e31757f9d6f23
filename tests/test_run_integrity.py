"""A run folder belongs to one config and one owner (issue 11 findings 1, 2, 3, 7; issue 18
items 1, 7, 8): fingerprinted resume, the lock, stop signals, metrics exactly once, temporary
files and disk errors, per-rank RNG states, buffers synced before evaluation and saving, and a
randomized SIGKILL test over a two-stage pipeline."""
import errno
import hashlib
import json
import multiprocessing
import os
import random
import signal
import socket
import textwrap
import time

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, needs_fmnist, run_cli
from ltrainer.trainer import checkpoint as ckpt
from ltrainer.trainer import engine
from ltrainer.trainer.config import load_config
from ltrainer.trainer.run_folder import FINGERPRINT, LOCK, RunFolder

pytestmark = needs_fmnist
CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")
TRAIN = os.path.join(ROOT, "launchers", "train.py")


@pytest.fixture
def over(tiny):
    """The tiny run with the BatchNorm-free MLP and no progress lines: a run takes ~1 s."""
    return tiny + ["model.name=mlp", "engine.progress=none"]


@pytest.fixture
def main(capsys):
    """launchers/train.py's main() in this process: (exit status, stderr); signal handlers
    and the stop flag are restored afterwards."""
    from ltrainer.launchers.train import main as train_main
    before = {s: signal.getsignal(s) for s in engine.STOP_SIGNALS}

    def run(*argv):
        capsys.readouterr()
        try:
            code = train_main(list(argv))
        finally:
            engine._STOP.clear()
        return code, capsys.readouterr().err
    yield run
    for s, h in before.items():
        signal.signal(s, h)
    engine._STOP.clear()


def stop_at(monkeypatch, step: int):
    """A stop request at the boundary after global step `step` (as a signal there would)."""
    original = engine.Trainer.stop_requested

    def stop_requested(self, steps=None):
        if steps is not None and self.global_step == step:
            engine.request_stop()
        return original(self, steps)
    monkeypatch.setattr(engine.Trainer, "stop_requested", stop_requested)


def stopped_run(main, monkeypatch, args, step: int = 5):
    """Run `args` until a stop at global step `step` (exit 143, checkpoint written)."""
    stop_at(monkeypatch, step)
    assert main(*args)[0] == engine.STOP_EXIT_STATUS
    monkeypatch.undo()


def snapshot(folder) -> dict:
    """Every file under a folder with its size and content hash (what 'nothing written' means)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "model_final.pt"), weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def records(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- finding 1

def test_changed_config_is_refused_after_finish_and_half_way(over, tmp_path, main, monkeypatch):
    """optim.lr=0.5 on a finished run used to print the lr 0.1 result as complete, and on a
    half-way run to resume silently with the restored optimizer's lr 0.1; model.name=... used
    to rewrite config.yaml before a load_state_dict traceback. Now each is refused, listing
    the key, and nothing in the folder changes."""
    args = [CE, *over]
    assert main(*args, "run.name=done")[0] == 0
    before = snapshot(tmp_path / "done")
    code, err = main(*args, "run.name=done", "optim.lr=0.5")
    assert code == 2 and "optim.lr: 0.1 -> 0.5" in err and "nothing was written" in err, err
    assert "run.name" in err
    assert snapshot(tmp_path / "done") == before

    stopped_run(main, monkeypatch, [*args, "run.name=half"], 8)
    half = tmp_path / "half"
    before = snapshot(half)
    code, err = main(*args, "run.name=half", "optim.lr=0.5")
    assert code == 2 and "optim.lr: 0.1 -> 0.5" in err, err
    code, err = main(*args, "run.name=half", "model.name=resnet8")
    assert code == 2 and "model.name: mlp -> resnet8" in err and "Traceback" not in err, err
    assert snapshot(half) == before                      # config.yaml untouched
    assert main(*args, "run.name=half")[0] == 0          # the same config resumes exactly
    assert_same_weights(weights(tmp_path / "done"), weights(half))
    assert records(tmp_path / "done") == records(half)


def test_a_key_added_to_the_trainer_later_at_its_default_is_no_change():
    """A run folder recorded before optim.ref_batch / model.sync_bn existed must still resume
    when they stay at their defaults (which keep the old behaviour); another value is a
    change, and a key that disappeared is one too."""
    from ltrainer.trainer.run_folder import _diff
    old = {"optim.lr": 0.1}
    assert _diff(old, {"optim.lr": 0.1, "optim.ref_batch": None, "model.sync_bn": False}) == {}
    assert _diff(old, {"optim.lr": 0.1, "model.sync_bn": True}) == {
        "model.sync_bn": ("(not set)", True)}
    assert _diff({"optim.lr": 0.1, "x.gone": 1}, {"optim.lr": 0.1}) == {
        "x.gone": (1, "(not set)")}


def test_pipeline_stage_with_changed_config_or_upstream_is_refused(over, tmp_path, main):
    """A finished stage is not reused when its config, its data (data.classes) or the stage it
    starts from changed."""
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(textwrap.dedent(f"""
        _base_: {CE}
        run: {{name: pipe}}
        stages:
          - name: a
          - name: b
            method: {{name: crt}}
            model: {{init: "@a"}}
            data: {{augment: none}}
        """))
    args = [str(pipe), *over, "sched.epochs=1", "sched.milestones=[]"]
    assert main(*args)[0] == 0
    root = tmp_path / "pipe"
    before = snapshot(root)
    code, err = main(*args, "a.optim.lr=0.5")
    assert code == 2 and "stage 'a'" in err and "optim.lr: 0.1 -> 0.5" in err, err
    code, err = main(*args, "data.classes=[0,1,2,3,4]")
    assert code == 2 and "stage 'a'" in err and "data.classes: null -> [0, 1, 2, 3, 4]" in err
    assert snapshot(root) == before
    # stage a trained again with another lr (its folder removed): stage b must not be reused
    for name in os.listdir(root / "a"):
        os.remove(root / "a" / name)
    code, err = main(*args, "a.optim.lr=0.5")
    assert code == 2 and "stage 'b'" in err and "model.init fingerprint" in err, err
    assert (root / "a" / "results.json").exists()


def test_keys_of_unused_components_and_run_settings_are_not_fingerprinted(over):
    """Another loss's margin, the pool of a method that reads none, the log cadence: free;
    the loss actually used: fingerprinted."""
    from ltrainer.trainer.run_folder import fingerprint
    digest = lambda *extra: fingerprint(load_config(CE, over + list(extra)), 1)["digest"]
    base = digest()
    assert digest("loss.ldam_s=10", "semi.rho_u=50", "engine.log_every=1",
                  "data.workers=2", "checkpoint.every_steps=3", "run.out_dir=/elsewhere") == base
    assert digest("loss.name=focal") != base
    ldam = ("loss.name=ldam", "model.head=cosine")
    assert digest(*ldam, "loss.ldam_s=10") != digest(*ldam)
    assert fingerprint(load_config(CE, over), 2)["digest"] != base    # the number of processes


def test_allowed_change_extends_a_finished_run(over, tmp_path, main):
    """sched.epochs may grow on resume when named in run.allow_change: training continues from
    the final checkpoint, the old final evaluation becomes epoch 3's, each record once."""
    args = [CE, *over, "run.name=r"]
    assert main(*args)[0] == 0
    code, err = main(*args, "sched.epochs=4")
    assert code == 2 and "run.allow_change=[sched.epochs]" in err, err
    assert main(*args, "sched.epochs=4", "run.allow_change=[sched.epochs]")[0] == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["epochs"] == 4
    recs = [(r["kind"], r["step"]) for r in records(tmp_path / "r")]
    assert len(recs) == len(set(recs))
    assert [k for k, _ in recs].count("eval_test") == 4     # after epochs 1, 2, 3 and the end
    assert "allowed changes on resume: sched.epochs: 3 -> 4" in (tmp_path / "r" / "run.log").read_text()
    code, err = main(*args, "sched.epochs=4", "run.allow_change=[optim.lr]")
    assert code == 2 and "optim.lr cannot change on resume" in err


def test_folder_without_fingerprint_is_adopted_when_its_config_matches(over, tmp_path, main,
                                                                        monkeypatch):
    args = [CE, *over, "run.name=old"]
    stopped_run(main, monkeypatch, args)
    os.remove(tmp_path / "old" / FINGERPRINT)            # as written before fingerprints
    code, err = main(*args, "optim.lr=0.5")
    assert code == 2 and "optim.lr: 0.1 -> 0.5" in err
    assert main(*args)[0] == 0
    assert "adopted a run folder" in (tmp_path / "old" / "run.log").read_text()
    assert (tmp_path / "old" / FINGERPRINT).exists()


# ----------------------------------------------------------------------------- finding 2

def test_second_process_on_a_run_folder_is_refused(over, tmp_path, main):
    """Two processes on one folder used to both run to the end (records twice, run.log
    interleaved). The second now stops at once naming the holder; a dead holder's lock (its
    file still naming it) is taken over, as a requeued Slurm job must."""
    args = [CE, *over, "run.name=one"]
    cfg = load_config(CE, over + ["run.name=one"])
    holder = RunFolder(str(tmp_path / "one"), cfg).open()     # this process owns the folder
    try:
        proc = run_cli(TRAIN, *args, check=False)
    finally:
        holder.close()
    assert proc.returncode == 2, proc.stderr
    assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    assert not (tmp_path / "one" / "metrics.jsonl").exists()
    (tmp_path / "one" / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone"}))
    stale = RunFolder(str(tmp_path / "one"), cfg).open()     # a Trainer a tool never closed
    assert main(*args)[0] == 0                               # this process takes it over
    stale.close()
    assert (tmp_path / "one" / LOCK).read_text() == ""       # released at the end


# ----------------------------------------------------------------------------- finding 3

def test_sigterm_mid_epoch_under_train_py_checkpoints_and_resumes_exactly(over, tmp_path, main):
    """launchers/train.py had no SIGTERM handler: exit 143 by the signal, no checkpoint."""
    args = [CE, *over]
    proc = run_cli(TRAIN, *args, "run.name=t", env={"LTT_TEST_KILL": "term:step:7"},
                   check=False)
    assert proc.returncode == engine.STOP_EXIT_STATUS, proc.stderr
    assert "stopped: checkpoint written" in proc.stderr
    assert ckpt.safe_load(str(tmp_path / "t" / ckpt.LAST))["progress"]["global_step"] == 7
    assert main(*args, "run.name=ref")[0] == 0
    assert main(*args, "run.name=t")[0] == 0
    assert_same_weights(weights(tmp_path / "ref"), weights(tmp_path / "t"))
    assert records(tmp_path / "ref") == records(tmp_path / "t")


def test_sigterm_to_the_nproc_launcher_stops_every_rank_at_a_checkpoint(over, tmp_path):
    """SIGTERM to the --nproc parent reaches both ranks, which agree on the same step; the
    checkpoint holds one RNG state per rank (the ranks here draw alike, so see
    test_two_ranks_restore_their_own_rng... for distinct states)."""
    proc = run_cli(TRAIN, CE, "--nproc", "2", *over, "run.name=p",
                   env={"LTT_TEST_KILL": "term-parent:step:3:p"}, check=False)
    assert proc.returncode == engine.STOP_EXIT_STATUS, proc.stderr
    state = ckpt.safe_load(str(tmp_path / "p" / ckpt.LAST))
    step = state["progress"]["global_step"]
    assert step % engine.STOP_CHECK_EVERY == 0 or step == 12, step    # an agreed boundary
    assert len(state["rng"]) == 2                                      # one state per rank


def test_sigterm_under_torchrun_stops_every_rank_at_a_checkpoint(over, tmp_path):
    """torchrun's ranks run train.py's main(): each handles SIGTERM (here sent to itself after
    step 3), and the ranks stop together at the next agreed step with status 143."""
    proc = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   TRAIN, CE, *over, "run.name=tr", env={"LTT_TEST_KILL": "term:step:3"},
                   check=False)
    assert proc.returncode != 0 and f"exitcode  : {engine.STOP_EXIT_STATUS}" in proc.stderr, \
        proc.stderr
    state = ckpt.safe_load(str(tmp_path / "tr" / ckpt.LAST))
    assert state["progress"]["global_step"] == engine.STOP_CHECK_EVERY
    assert len(state["rng"]) == 2


def test_sigterm_during_evaluation_keeps_the_epoch(over, tmp_path, main, monkeypatch):
    """The epoch checkpoint used to be written after evaluation, so a stop there lost the
    epoch; now it is written before, and a stop asked during evaluation saves after it."""
    from ltrainer.trainer import run_log
    args = [CE, *over]
    assert main(*args, "run.name=ref")[0] == 0
    original = run_log.RunLog.metrics

    def metrics(self, record):
        original(self, record)
        if record["kind"] == "eval_test" and record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(run_log.RunLog, "metrics", metrics)
    assert main(*args, "run.name=e")[0] == engine.STOP_EXIT_STATUS
    monkeypatch.undo()
    p = ckpt.safe_load(str(tmp_path / "e" / ckpt.LAST))["progress"]
    assert (p["epoch"], p["step_in_epoch"], p["eval_pending"]) == (1, 0, False)
    assert main(*args, "run.name=e")[0] == 0
    assert_same_weights(weights(tmp_path / "ref"), weights(tmp_path / "e"))
    assert records(tmp_path / "ref") == records(tmp_path / "e")


# ----------------------------------------------------------------------------- finding 7

def test_stale_temp_files_are_removed_and_train_seconds_add_up(over, tmp_path, main,
                                                                monkeypatch):
    args = [CE, *over, "run.name=s"]
    stopped_run(main, monkeypatch, args)
    run = tmp_path / "s"
    (run / (ckpt.LAST + ".tmp.4242")).write_bytes(b"half-written")
    (run / "results.json.tmp").write_text("{")
    state = ckpt.safe_load(str(run / ckpt.LAST))
    state["progress"]["train_seconds"] = 1000.0          # as if the first attempt took long
    torch.save(state, run / ckpt.LAST)
    assert main(*args)[0] == 0
    assert not [n for n in os.listdir(run) if ".tmp" in n]
    assert "removed temporary files of an interrupted save" in (run / "run.log").read_text()
    assert json.loads((run / "results.json").read_text())["train_seconds"] >= 1000.0


def test_full_disk_is_reported_in_words(over, tmp_path, main, monkeypatch):
    """A full disk used to surface as torch's 'unexpected pos 88448 vs 88344'."""
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    # the checkpoint's writes fill the disk (the run folder's JSON files go through the same
    # atomic writer, and are written first)
    monkeypatch.setattr(ckpt, "open", lambda p, mode="r": FullDisk(real_open(p, mode))
                        if ".pt" in p else real_open(p, mode), raising=False)
    code, err = main(CE, *over, "run.name=full")
    path = tmp_path / "full" / ckpt.LAST
    assert code == 2 and f"disk error: disk full while writing {path}" in err, err
    assert "unexpected pos" not in err
    assert not [n for n in os.listdir(tmp_path / "full") if ".tmp" in n]


def test_read_only_folder_is_reported_in_words(over, tmp_path, main, monkeypatch):
    """(As root a chmod does not stop writes, so the file system's answer is patched in.)"""
    real_open = os.open

    def read_only(path, *args, **kw):
        if str(path).endswith(LOCK):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kw)
    monkeypatch.setattr(os, "open", read_only)
    code, err = main(CE, *over, "run.name=ro")
    monkeypatch.undo()
    assert code == 2, err
    assert f"disk error: read-only file system while writing {tmp_path / 'ro' / LOCK}" in err


# ----------------------------------------------------------------------------- issue 18

def test_resume_loads_rng_states_on_the_cpu(over, tmp_path, monkeypatch):
    """Item 1: the checkpoint was loaded with map_location=self.device, so on a GPU the RNG
    states came back as CUDA tensors and torch.set_rng_state failed on every resume. A
    'meta' device stands in for CUDA here: loading there must still restore the CPU state."""
    stop_at(monkeypatch, 5)
    cfg = load_config(CE, over + ["run.name=m"])
    with pytest.raises(engine.Preempted):
        engine.train(cfg)
    monkeypatch.undo()
    engine._STOP.clear()
    trainer = engine.Trainer(cfg)
    try:
        saved = ckpt.safe_load(str(tmp_path / "m" / ckpt.LAST))["rng"][0]["torch"]
        torch.manual_seed(12345)
        trainer.device = torch.device("meta")
        trainer._resume()
        assert torch.equal(torch.get_rng_state(), saved)
    finally:
        trainer.folder.close()
        trainer.log.close()


def test_ranks_agree_on_a_stop_only_every_n_steps():
    """Item 8: the stop check was an all-reduce and .item() at every step. With several
    processes it now runs every STOP_CHECK_EVERY steps and at the epoch's last step."""
    from types import SimpleNamespace

    from ltrainer.trainer import distributed as dist_utils
    calls = []
    real = dist_utils.any_rank
    dist_utils.any_rank = lambda flag: calls.append(flag) or False
    try:
        fake = SimpleNamespace(info=SimpleNamespace(enabled=True))
        for step in range(1, 26):
            fake.global_step = fake.step_in_epoch = step
            engine.Trainer.stop_requested(fake, steps=25)
        fake.info.enabled = False
        engine.Trainer.stop_requested(fake, steps=25)
    finally:
        dist_utils.any_rank = real
    assert len(calls) == 3                               # steps 10, 20 and 25 (epoch end)


def _two_ranks(out_dir: str, overrides: list):
    """In each of 2 gloo processes: per-rank RNG states through a checkpoint file, buffer
    broadcast, and an engine run recording the BatchNorm buffers each rank evaluates."""
    import random as pyrandom

    from ltrainer.trainer import distributed as dist_utils
    info = dist_utils.setup("cpu", "gloo")
    rank = info.rank

    def draws():
        return [torch.rand(3).tolist(), np.random.rand(2).tolist(), pyrandom.random()]
    engine.seed_everything(100 + rank)
    states = dist_utils.all_gather_object(ckpt.rng_state())
    expected = draws()
    path = os.path.join(out_dir, "rng.pt")
    if rank == 0:
        ckpt.atomic_save({"rng": states}, path)
    dist_utils.barrier()
    engine.seed_everything(0)
    ckpt.set_rng_state(ckpt.rank_rng_state(ckpt.safe_load(path)["rng"], rank))
    rng_ok = draws() == expected

    bn = torch.nn.BatchNorm1d(4)
    bn.running_mean.fill_(float(rank))
    before = bn.running_mean.tolist()
    dist_utils.broadcast_buffers([bn])
    after = bn.running_mean.tolist()

    seen = []
    original = engine.Trainer.predict

    def predict(self, split, *args):
        seen.append([float(b.double().sum()) for b in self.model.buffers()])
        return original(self, split, *args)
    engine.Trainer.predict = predict
    engine.train(load_config(CE, overrides))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rng_ok": rng_ok, "draw": expected, "before": before, "after": after,
                   "eval_buffers": seen}, f)


def test_two_ranks_restore_their_own_rng_and_evaluate_rank_zeros_buffers(tiny, tmp_path):
    """Item 1: every rank restored rank 0's RNG state; item 7: after the last step each rank
    kept its own BatchNorm statistics, so ranks evaluated different models."""
    from ltrainer.trainer import distributed as dist_utils
    over = tiny + ["run.name=two", "engine.progress=none", "sched.epochs=1",
                   "sched.milestones=[]", "engine.max_steps=4"]
    dist_utils.run_local(_two_ranks, 2, {"out_dir": str(tmp_path), "overrides": over})
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rng_ok"] and r1["rng_ok"] and r0["draw"] != r1["draw"]
    assert r0["before"] != r1["before"] and r0["after"] == r1["after"] == r0["before"]
    assert r0["eval_buffers"] and r0["eval_buffers"] == r1["eval_buffers"]
    assert len(ckpt.safe_load(str(tmp_path / "two" / ckpt.LAST))["rng"]) == 2


# ----------------------------------------------------------------------------- randomized kills

PIPELINE = """
_base_: {ce}
run: {{name: kp}}
stages:
  - name: a
    checkpoint: {{every_steps: 5}}
  - name: b
    method: {{name: crt}}
    model: {{init: "@a"}}
    data: {{augment: none}}
    checkpoint: {{every_steps: 4}}
"""


def _attempt(config: str, overrides: list, spec: str | None):
    """One attempt of the pipeline in a child forked from a server that has torch imported;
    `spec` installs a kill point (tests/kill_points.py)."""
    from tests import kill_points
    from ltrainer.trainer.pipeline import load_plan, run_plan
    if spec:
        kill_points.install(spec)
    run_plan(load_plan(config, overrides))


def _run_attempt(ctx, config, overrides, spec) -> int:
    p = ctx.Process(target=_attempt, args=(config, overrides, spec))
    p.start()
    p.join(300)
    return p.exitcode


def test_randomized_kills_over_a_two_stage_pipeline(over, tmp_path):
    """SIGKILL at 8 points (random steps, before the first checkpoint, half-way through a
    checkpoint save, during evaluations, in the final save of both stages), resuming after
    each: the final weights of both stages are bit-exact and metrics.jsonl equals the
    uninterrupted run's record for record."""
    seed = int(os.environ.get("LTT_KILL_SEED", time.time_ns() % 10**6))
    rnd = random.Random(seed)
    config = tmp_path / "kp.yaml"
    config.write_text(PIPELINE.format(ce=CE))
    base = [o for o in over if not o.startswith("run.out_dir")] + [
        "sched.epochs=2", "sched.milestones=[]", "b.sched.epochs=2"]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ltrainer.trainer.engine", "ltrainer.trainer.pipeline", "tests.kill_points"])
    ref = base + [f"run.out_dir={tmp_path / 'ref'}"]
    assert _run_attempt(ctx, str(config), ref, None) == 0
    steps = max(r["step"] for r in records(tmp_path / "ref" / "kp" / "a"))       # 24
    steps_b = max(r["step"] for r in records(tmp_path / "ref" / "kp" / "b"))
    plan = [f"kill:step:{rnd.randint(1, 4)}:a",           # before the first checkpoint
            "kill:save:1:a",                              # the next save, half-written
            "kill:eval:1:a",                              # the evaluation after epoch 1
            f"kill:step:{rnd.randint(steps // 2 + 1, steps - 1)}:a",
            "kill:final:1:a",                             # the final save of stage a
            f"kill:step:{rnd.randint(1, steps_b - 1)}:b",
            "kill:eval:1:b",
            "kill:final:1:b"]
    killed = base + [f"run.out_dir={tmp_path / 'killed'}"]
    for spec in plan:
        code = _run_attempt(ctx, str(config), killed, spec)
        assert code == -signal.SIGKILL, f"{spec} (seed {seed}) exit {code}"
    assert _run_attempt(ctx, str(config), killed, None) == 0
    for stage in ("a", "b"):
        ra, rb = tmp_path / "ref" / "kp" / stage, tmp_path / "killed" / "kp" / stage
        assert_same_weights(weights(ra), weights(rb))
        assert records(ra) == records(rb), f"stage {stage} (seed {seed})"
        res_a, res_b = (json.loads((d / "results.json").read_text()) for d in (ra, rb))
        res_a.pop("train_seconds"), res_b.pop("train_seconds")
        assert res_a == res_b
        assert not [n for n in os.listdir(rb) if ".tmp" in n]


def test_a_list_edited_under_the_same_path_is_another_data_set(over, tmp_path, main,
                                                                small_test_list):
    """The fingerprint holds each list file's sha1: a regenerated list under the same name
    is refused by name ('data.test_list content'); a record from before digests existed
    (no content key) still resumes."""
    lst = tmp_path / "test.txt"
    lst.write_text(open(small_test_list).read())
    args = [CE, *over, "run.name=r", f"data.test_list={lst}"]
    assert main(*args)[0] == 0
    assert main(*args)[0] == 0                                  # unchanged: finished, skipped
    lst.write_text(open(small_test_list).read().replace("\n0 ", "\n1 ", 1))  # one label edited
    code, err = main(*args)
    assert code == 2 and "data.test_list content: " in err, err
    fp = json.loads((tmp_path / "r" / FINGERPRINT).read_text())    # as written before digests
    del fp["keys"]["data.test_list content"]
    (tmp_path / "r" / FINGERPRINT).write_text(json.dumps(fp))
    assert main(*args)[0] == 0
