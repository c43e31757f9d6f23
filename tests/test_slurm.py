"""launchers/submit.py on a real Slurm cluster (tools/local_slurm.sh: slurmctld, 4 slurmd and
munged on this host): a 4-node pipeline, preemption/requeue resuming to identical weights, a
node that dies mid-run, bad requests refused before submission, a job-array sweep, --local.

Nothing of Slurm is mocked. The module starts the cluster unless one is already up, and stops
what it started even when a test fails. Budgets are tiny: 1 epoch per stage on ~400 images.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import ROOT, needs_fmnist, run_cli

SLURM_SH = os.path.join(ROOT, "tools", "local_slurm.sh")
SUBMIT = os.path.join(ROOT, "launchers", "submit.py")
PIPELINE = os.path.join(ROOT, "configs", "fmnist_lt_moco_crt.yaml")
CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")
SWEEP = os.path.join(ROOT, "configs", "sweeps", "fmnist_sweep.yaml")
STAGES = ("pretrain", "ce", "crt", "ldam_drw")


def _slurm_missing() -> str:
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol")
               if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y "
                f"--no-install-recommends munge slurmctld slurmd slurm-client")
    return ""


def _submitit_missing() -> str:
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed: pip install submitit (or pip install -e '.[slurm]')"
    return ""


pytestmark = [needs_fmnist, pytest.mark.skipif(bool(_submitit_missing()), reason=_submitit_missing())]


# --------------------------------------------------------------------------- cluster

def _sh(*args, timeout=120, check=True):
    return subprocess.run(["bash", SLURM_SH, *args], capture_output=True, text=True, timeout=timeout,
                          check=check)


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, its client environment exported into this process (the CLI runs and
    submitit inherit it). Started here unless already up; then stopped here, always."""
    if _slurm_missing():
        pytest.skip(_slurm_missing())
    started = _sh("status", check=False).returncode != 0
    if started:
        up = _sh("up", check=False)
        if up.returncode:
            _sh("down", check=False)
            pytest.fail(f"tools/local_slurm.sh up failed:\n{up.stdout}\n{up.stderr}")
    env = dict(re.findall(r"^export (\w+)=(.*)$", _sh("env").stdout, re.M))
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    os.environ["PATH"] = env["PATH"].replace("$PATH", os.environ["PATH"])
    try:
        yield env["SLURM_CONF"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started:
            _sh("down", check=False)


def squeue_field(job_id: str, fmt: str) -> str:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", fmt],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return out.splitlines()[0] if out else ""


def restarts(job_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    m = re.search(r"Restarts=(\d+)", out)
    return int(m.group(1)) if m else -1


def wait_for(cond, timeout: float, what: str, job_id: str | None = None, poll=0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    state = squeue_field(job_id, "%T %r") if job_id else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (job {job_id}: "
                         f"{state})\n{_sh('status', check=False).stdout}")


def wait_done(job_id: str, timeout: float = 300):
    """Until the job has ended; returns its final state."""
    return wait_for(lambda: (s := squeue_field(job_id, "%T")) not in
                    ("", "PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED") and s,
                    timeout, "the job to end", job_id, poll=0.5)


# --------------------------------------------------------------------------- runs

def tiny(out_dir, test_list):
    """~400 LT images, batch 16 (25 steps per epoch, long enough to be interrupted), 1 epoch per
    stage, a 300-image test set; every step logged so tests can follow progress."""
    return [f"run.out_dir={out_dir}", "run.deterministic=true", "sched.epochs=1",
            "data.n_max=100", "data.rho=10", "data.batch_size=16", "moco.queue=128",
            "data.eval_batch_size=300", f"data.test_list={test_list}", "engine.log_every=1",
            "engine.progress=lines", "checkpoint.every_steps=5"]


def submit(*args) -> tuple[str, str]:
    """Run launchers/submit.py; returns (job id, its output)."""
    proc = run_cli(SUBMIT, *args)
    m = re.search(r"^job id: (\S+)$", proc.stdout, re.M)
    assert m, proc.stdout
    return m.group(1), proc.stdout


def root_of(out_dir):
    return os.path.join(out_dir, "fmnist_lt_moco_crt")


def ranks(run_root) -> list[dict]:
    path = os.path.join(run_root, "ranks.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_done(run_root, stage) -> int:
    path = os.path.join(run_root, stage, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum('"train"' in line for line in f)


def final_weights(run_root, stage):
    return torch.load(os.path.join(run_root, stage, "model_final.pt"), weights_only=True)


def assert_same_final_weights(a_root, b_root):
    for stage in STAGES:
        a, b = final_weights(a_root, stage), final_weights(b_root, stage)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs by " \
                f"{(a[k].double() - b[k].double()).abs().max().item():.3g}"


def log_text(run_root) -> str:
    return "".join(open(os.path.join(run_root, s, "run.log")).read() for s in STAGES
                   if os.path.exists(os.path.join(run_root, s, "run.log")))


@pytest.fixture(scope="module")
def two_node_reference(cluster, tmp_path_factory, small_test_list):
    """An uninterrupted 2-node run of the pipeline: what interrupted runs must reproduce."""
    out = str(tmp_path_factory.mktemp("ref2"))
    run_cli(SUBMIT, "--nodes", "2", "--follow", PIPELINE, *tiny(out, small_test_list))
    return root_of(out)


# --------------------------------------------------------------------------- tests

def test_bad_requests_fail_before_submission(cluster, tmp_path, capsys):
    """Unknown key, missing data, too many nodes, unknown partition, GPUs on a CPU partition:
    exit 2 with a message that names the problem, and nothing reaches the queue."""
    from ltrainer.launchers import submit
    before = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True,
                            text=True).stdout.split()
    out = ["run.out_dir=" + str(tmp_path / "runs")]
    cases = [
        ([PIPELINE, "optim.lrr=0.1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ([PIPELINE, "slurm.nodez=2"], "unknown key 'slurm.nodez'; did you mean 'slurm.nodes'?"),
        ([PIPELINE, "data.root=/nonexistent/fmnist"],
         "data.root = '/nonexistent/fmnist': folder not found"),
        (["--nodes", "5", PIPELINE], "5 nodes (--nodes / slurm.nodes): partition 'debug' has only 4"),
        ([PIPELINE, "slurm.nodes=8"], "8 nodes (--nodes / slurm.nodes): partition 'debug' has only 4"),
        (["--partition", "gpu_a100", PIPELINE], "partition 'gpu_a100' (--partition / "
                                                "slurm.partition) does not exist; partitions: debug"),
        (["--gpus-per-node", "1", PIPELINE], "only 0 node(s) of partition 'debug' have that many GPUs"),
        (["--nodes", "3", PIPELINE], "not divisible by the 3 ranks"),
    ]
    for args, message in cases:
        rc = submit.main(args + out)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (args, err)
    after = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True,
                           text=True).stdout.split()
    assert after == before
    assert not (tmp_path / "runs").exists()


def test_four_node_pipeline(cluster, tmp_path, small_test_list):
    """MoCo -> CE -> cRT (+ LDAM-DRW) on 4 nodes: every rank joins one gloo group of 4 (each
    logs it, in its own task log and in ranks.jsonl), and results land in the run folder."""
    out = str(tmp_path)
    proc = run_cli(SUBMIT, "--nodes", "4", "--follow", PIPELINE, *tiny(out, small_test_list))
    job_id = re.search(r"^job id: (\S+)$", proc.stdout, re.M).group(1)
    root = root_of(out)
    assert f"run folder: {root}" in proc.stdout and "rank 0 log:" in proc.stdout
    assert re.search(r"pretrain: .*epoch 1/1 step \d+/25", proc.stdout)  # --follow showed progress
    for stage in STAGES:
        res = json.loads(open(os.path.join(root, stage, "results.json")).read())
        assert res["world_size"] == 4 and res["global_step"] > 0, stage
        assert f"{stage}: balanced error" in proc.stdout
        assert "with 4 process(es)" in open(os.path.join(root, stage, "run.log")).read()
    recs = ranks(root)
    assert sorted(r["rank"] for r in recs) == [0, 1, 2, 3]
    assert {r["node"] for r in recs} == {"node1", "node2", "node3", "node4"}
    assert all(r["world_size"] == 4 and r["allreduce_world"] == 4 for r in recs)
    folder = re.search(r"^submitit folder: (\S+)$", proc.stdout, re.M).group(1)
    for t in range(4):
        log = open(os.path.join(folder, f"{job_id}_{t}_log.out")).read()
        assert f"joined rank {t}/4 (all-reduce saw 4)" in log
    assert wait_done(job_id, 60) == "COMPLETED"


def test_preemption_timeout_and_requeue_resume_to_identical_weights(
        cluster, tmp_path, small_test_list, two_node_reference):
    """Three interruptions in mid-training, each answered by a checkpoint at the next step
    boundary and a requeue that resumes that stage at that step:
    1. submitit's preemption (SIGTERM + SIGUSR2: checkpoint() waits for the save, submitit
       requeues), 2. a time-limit warning (SIGUSR2 only), both in the MoCo stage,
    3. `scontrol requeue` (SIGTERM; Slurm requeues) in the CE stage.
    The final weights of every stage equal the uninterrupted run's bit for bit.

    2 nodes, not 4: two ranks' all-reduce is a + b, which is exact in any order. With more ranks
    gloo's ring sums each gradient in an order set by its offset in DDP's buckets, and DDP
    re-buckets after the first step of every process, so the first step after a resume rounds
    differently (see the report: an order-free comm hook in the engine would fix it)."""
    import submitit
    out = str(tmp_path)
    job_id, stdout = submit("--nodes", "2", PIPELINE, *tiny(out, small_test_list))
    root = root_of(out)
    job = submitit.SlurmJob(folder=re.search(r"^submitit folder: (\S+)$", stdout, re.M).group(1),
                            job_id=job_id)
    attempt_up = lambda a: sum(r["attempt"] == a for r in ranks(root)) == 2

    wait_for(lambda: steps_done(root, "pretrain") >= 3, 180, "pretrain step 3", job_id)
    job._interrupt()                                    # preemption: SIGTERM, then SIGUSR2
    wait_for(lambda: attempt_up(1), 180, "both ranks of attempt 1", job_id)
    first = steps_done(root, "pretrain")
    wait_for(lambda: steps_done(root, "pretrain") >= first + 3, 180, "3 more pretrain steps", job_id)
    job._interrupt(timeout=True)                        # time limit near: SIGUSR2 only
    wait_for(lambda: attempt_up(2), 180, "both ranks of attempt 2", job_id)
    wait_for(lambda: steps_done(root, "ce") >= 3, 180, "ce step 3", job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    wait_for(lambda: attempt_up(3), 180, "both ranks of attempt 3", job_id)
    assert wait_done(job_id) == "COMPLETED"

    assert restarts(job_id) == 3
    text = log_text(root)
    stopped = re.findall(r"stop requested: checkpoint written at epoch 0, step (\d+)", text)
    resumed = re.findall(r"resumed from \S+/(\w+)/checkpoint_last.pt: epoch 0, step (\d+)", text)
    assert len(stopped) == 3 and [s for _, s in resumed] == stopped, text
    assert [stage for stage, _ in resumed] == ["pretrain", "pretrain", "ce"], text
    assert_same_final_weights(two_node_reference, root)
    steps = lambda r, s: [json.loads(l)["step"] for l in open(os.path.join(r, s, "metrics.jsonl"))
                          if '"train"' in l]
    for stage in STAGES:  # each step logged once, as in the uninterrupted run
        assert steps(root, stage) == steps(two_node_reference, stage)


def test_node_failure_requeues_and_completes(cluster, tmp_path, small_test_list,
                                             two_node_reference):
    """The second node dies mid-run (its slurmd, slurmstepd and task are SIGKILLed, as in a power
    loss); the surviving rank waits instead of failing, Slurm marks the node DOWN and requeues
    the job, the node comes back, and the job resumes from its last checkpoint to the same
    final weights."""
    out = str(tmp_path)
    job_id, stdout = submit("--nodes", "2", PIPELINE, *tiny(out, small_test_list))
    root = root_of(out)
    folder = re.search(r"^submitit folder: (\S+)$", stdout, re.M).group(1)
    wait_for(lambda: steps_done(root, "pretrain") >= 8, 180, "pretrain step 8", job_id)
    victim = next(r for r in ranks(root) if r["rank"] == 1)
    node = victim["node"]
    state_dir = os.path.dirname(cluster)
    slurmd_pid = int(open(os.path.join(state_dir, "run", f"slurmd-{node}.pid")).read())
    stepd_pid = int(open(f"/proc/{victim['pid']}/stat").read().rsplit(")", 1)[1].split()[1])
    assert "slurmstepd" in open(f"/proc/{stepd_pid}/cmdline").read()
    for pid in (slurmd_pid, stepd_pid, victim["pid"]):
        os.kill(pid, signal.SIGKILL)

    wait_for(lambda: restarts(job_id) >= 1, 120, "Slurm to requeue the job", job_id, poll=1)
    wait_for(lambda: "down" in subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"],
                                              capture_output=True, text=True).stdout,
             30, f"{node} to be marked DOWN", job_id)
    _sh("up")  # the node is back
    assert wait_done(job_id) == "COMPLETED"
    assert sorted(r["rank"] for r in ranks(root) if r["attempt"] == 1) == [0, 1]
    text = log_text(root)
    assert "resumed from" in text
    survivor = open(os.path.join(folder, f"{job_id}_0_log.out")).read()
    assert "a peer rank failed" in survivor
    assert_same_final_weights(two_node_reference, root)


def test_sweep_two_configs_two_seeds(cluster, tmp_path, small_test_list):
    """configs/sweeps/fmnist_sweep.yaml (CE, LDAM-DRW x seeds 0, 1) as one job array of 4 runs;
    --follow waits for all and prints collect_results' table: one row per method, 2 seeds."""
    out = tmp_path / "sweep"
    over = [o for o in tiny(tmp_path, small_test_list) if not o.startswith(("run.out_dir", "moco"))]
    proc = run_cli(SUBMIT, "--sweep", SWEEP, "--out", str(out), "--nodes", "1", "--follow",
                   *over, "engine.log_every=10", "sched.warmup_epochs=0", "train_rule.start_epoch=0")
    ids = re.findall(r"^job (\d+_\d): ", proc.stdout, re.M)
    assert len(set(ids)) == 4 and len({i.split("_")[0] for i in ids}) == 1, proc.stdout  # one array
    for name in ("fmnist_lt_ce", "fmnist_lt_ldam_drw"):
        assert re.search(rf"^\| {name} \| 2 \| \d+\.\d+ ± \d+\.\d+ \|", proc.stdout, re.M), proc.stdout
        for seed in (0, 1):
            res = json.loads((out / f"s{seed}" / name / "results.json").read_text())
            assert res["seed"] == seed
    for ext in ("md", "csv", "png"):
        assert (out / f"table.{ext}").exists()
    assert "many acc %" in (out / "table.md").read_text()


def test_local_runs_the_same_job_without_slurm(tmp_path, small_test_list):
    """--local: the same job object through submitit's local executor (2 processes here)."""
    over = [o for o in tiny(tmp_path, small_test_list) if not o.startswith("moco")]
    env = {"PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                   if "slurm_shims" not in p)}
    proc = run_cli(SUBMIT, "--local", "--nodes", "2", "--follow", CE, *over, "engine.max_steps=6",
                   env=env)
    res = json.loads((tmp_path / "fmnist_lt_ce" / "results.json").read_text())
    assert res["world_size"] == 2 and res["global_step"] == 6
    assert "fmnist_lt_ce: balanced error" in proc.stdout
