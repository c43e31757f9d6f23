"""The real workload rehearsed at its true class counts on tiny images (issue 12 item 6):
the ImageNet-LT-shaped MoCo -> CE -> cRT pipeline with `submit.py --nodes 4` on the local Slurm
cluster (1,000 classes: the real val/test lists, a train list from the real counts), and the
iNat-shaped (8,142 classes) pipeline's --dry-run plus a few steps of every stage on one process.

Images come from tools/make_synthetic_lt.py (tiny, 1 per class per split: every class kept);
the model is ResNet-8 at 16 px so that what is tested is what grows with the class count.
"""
import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import ROOT, run_cli
from tests.test_slurm import SUBMIT, _submitit_missing, cluster, submit, wait_done  # noqa: F401

LISTS = os.path.join(os.path.dirname(ROOT), "shared", "lists")   # ../shared/lists (its README)
MAKE = os.path.join(ROOT, "tools", "make_synthetic_lt.py")
TRAIN = os.path.join(ROOT, "launchers", "train.py")
# MoCo's aug+ costs ~20 ms per 16-px image here (40x the ImageNet recipe): its batches stay
# small, and every stage stops after engine.max_steps (marked partial, read by the next stage).
TINY = ["model.name=resnet8", "data.image_size=16", "engine.amp=none",
        "model.channels_last=false", "data.workers=0", "sched.epochs=1",
        "engine.progress=lines", "engine.log_every=1", "run.deterministic=true"]
STAGES = ("pretrain", "ce", "crt")
RESULTS_BOUND = 1_000_000          # bytes: results.json whatever the class count
RSS_BOUND_MB = 1500                # peak RSS of one rank (torch alone is ~400 MB here)

needs_lists = pytest.mark.skipif(not os.path.isdir(LISTS),
                                 reason=f"the real benchmark lists are not at {LISTS}")


def synth(out, *args):
    run_cli(MAKE, "--out", str(out), "--size", "tiny", "--max-per-class", "1", "--jobs", "2",
            *args)
    return str(out)


@pytest.fixture(scope="module")
def inlt(tmp_path_factory):
    """1,000 classes: one image per class of the real val and test lists and of a train list
    made from the real ImageNet-LT counts."""
    return synth(tmp_path_factory.mktemp("inlt"), "--profile", "imagenet_lt", "--counts",
                 os.path.join(LISTS, "ImageNet_LT_train_counts.json"),
                 "--list", os.path.join(LISTS, "ImageNet_LT_val.txt.gz"),
                 "--list", os.path.join(LISTS, "ImageNet_LT_test.txt.gz"))


@pytest.fixture(scope="module")
def inat(tmp_path_factory):
    """8,142 classes: one image per class of the real iNat 2018 val list and of the
    iNat-shaped train list."""
    return synth(tmp_path_factory.mktemp("inat"), "--profile", "inat2018",
                 "--list", os.path.join(LISTS, "iNaturalist18_val.txt.gz"))


def data_args(folder, prefix, splits):
    return [f"data.root={folder}/images"] + [f"data.{s}_list={folder}/{prefix}_{s}.txt"
                                             for s in splits]


def rank_peaks(job_id: str) -> dict:
    """SLURM_PROCID -> peak RSS (VmHWM, MB) of this job's python rank processes running now
    (not the shells and srun around them)."""
    peaks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if env.get(b"SLURM_JOB_ID") != job_id.encode() or b"SLURM_PROCID" not in env or \
                    b"python" not in os.path.basename(argv[0]) or b"submitit" not in b" ".join(argv):
                continue
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if m:
            rank = int(env[b"SLURM_PROCID"])
            peaks[rank] = max(peaks.get(rank, 0), int(m.group(1)) / 1024)
    return peaks


def check_results(run_root, classes, world):
    for stage in STAGES:
        path = os.path.join(run_root, stage, "results.json")
        size = os.path.getsize(path)
        assert size < RESULTS_BOUND, f"{stage}: results.json is {size:,} bytes"
        res = json.loads(open(path).read())
        assert res["world_size"] == world and res["global_step"] > 0, stage
        assert res["num_samples"] == classes, stage   # one evaluation image per class


@needs_lists
@pytest.mark.skipif(bool(_submitit_missing()), reason=_submitit_missing())
def test_imagenet_lt_pipeline_on_four_slurm_nodes(cluster, inlt, tmp_path):  # noqa: F811
    """1,000 classes, 4 nodes: every stage finishes with world size 4, results.json stays under
    1 MB, and no rank's peak RSS exceeds RSS_BOUND_MB (sampled from /proc while it runs)."""
    out = str(tmp_path / "runs")
    job_id, _ = submit("--nodes", "4", os.path.join(ROOT, "configs", "imagenet_lt_moco_crt.yaml"),
                       *data_args(inlt, "ImageNet_LT", ("train", "val", "test")), *TINY,
                       f"run.out_dir={out}", "data.batch_size=128", "pretrain.data.batch_size=64",
                       "crt.data.batch_size=128", "data.eval_batch_size=256", "moco.queue=256",
                       "engine.max_steps=2")
    peaks, end = {}, time.time() + 300
    while time.time() < end:
        for rank, mb in rank_peaks(job_id).items():
            peaks[rank] = max(mb, peaks.get(rank, 0))
        state = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if state not in ("", "PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.2)
    assert wait_done(job_id, 30) == "COMPLETED"
    root = os.path.join(out, "imagenet_lt_moco_crt")
    check_results(root, 1000, 4)
    print(f"peak RSS per rank (MB): {({r: round(v) for r, v in sorted(peaks.items())})}")
    assert sorted(peaks) == [0, 1, 2, 3], f"saw ranks {sorted(peaks)} of job {job_id}"
    assert max(peaks.values()) < RSS_BOUND_MB, f"peak RSS per rank (MB): {sorted(peaks.values())}"


@needs_lists
def test_inat_dry_run_and_every_stage_on_one_process(inat, tmp_path):
    """configs/inat_moco_crt.yaml at 8,142 classes: --dry-run passes, then MoCo, CE and cRT
    each train a few steps and evaluate on val, with small results.json files."""
    over = [*data_args(inat, "iNaturalist18", ("train", "val")), *TINY,
            f"run.out_dir={tmp_path}", "data.batch_size=512", "pretrain.data.batch_size=128",
            "crt.data.batch_size=512", "data.eval_batch_size=2048", "moco.queue=4096",
            "engine.max_steps=2"]
    config = os.path.join(ROOT, "configs", "inat_moco_crt.yaml")
    dry = run_cli(TRAIN, config, *over, "--dry-run")
    assert "8142" in dry.stdout.replace(",", "") or "8,142" in dry.stdout, dry.stdout
    proc = run_cli(TRAIN, config, *over)
    root = os.path.join(str(tmp_path), "inat_moco_crt")
    check_results(root, 8142, 1)
    for stage in STAGES:
        res = json.loads(open(os.path.join(root, stage, "results.json")).read())
        assert res.get("split", "val") == "val", (stage, res.get("split"))
    assert "crt" in proc.stdout
