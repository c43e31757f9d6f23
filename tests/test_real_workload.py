"""Issue 12, the config / launcher / data-location side: --dry-run runs the list checks and
prints the plan, the linear lr scaling rule, classes without training images, iNat on val,
threads and workers from the allocation, $LTRAINER_DATA, write_beton of a staged config."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, needs_fmnist, run_cli

INAT = os.path.join(ROOT, "configs", "inat_moco_crt.yaml")
INLT = os.path.join(ROOT, "configs", "imagenet_lt_moco_crt.yaml")


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def write_set(folder, lists: dict, images=True):
    """Write {file name: [(path, label)]} under folder, and one tiny JPEG per listed path
    under folder/images (images=False: the lists only)."""
    os.makedirs(folder, exist_ok=True)
    data = _jpeg()
    for name, lines in lists.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write("".join(f"{p} {y}\n" for p, y in lines))
        for p, _ in lines if images else ():
            path = os.path.join(folder, "images", p)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)


def imagenet_lt_lists(classes: int, per_class=lambda c: 1 + c % 5):
    wn = [f"n{c:08d}" for c in range(classes)]
    train = [(f"train/{wn[c]}/{wn[c]}_{k}.JPEG", c) for c in range(classes)
             for k in range(per_class(c))]
    val = [(f"train/{wn[c]}/{wn[c]}_v.JPEG", c) for c in range(classes)]
    test = [(f"val/{wn[c]}/ILSVRC2012_val_{c:08d}.JPEG", c) for c in range(classes)]
    return {"ImageNet_LT_train.txt": train, "ImageNet_LT_val.txt": val,
            "ImageNet_LT_test.txt": test}


def dry_run(capsys, *args):
    from ltrainer.launchers.train import main
    rc = main([*args, "--dry-run"])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ finding 3: --dry-run checks

def test_dry_run_reports_every_list_problem_at_once(tmp_path, capsys, monkeypatch):
    """A truncated list, labels beyond num_classes, a class without training images and a root
    holding none of the images: every problem, one line each, after the plan; before, all
    passed as "valid". data.check_files: true stats every image."""
    monkeypatch.setenv("LTRAINER_DATA", str(tmp_path))
    lists = imagenet_lt_lists(4)
    lists["ImageNet_LT_train.txt"] = [l for l in lists["ImageNet_LT_train.txt"] if l[1] != 2]
    lists["ImageNet_LT_val.txt"].append(("train/n00000009/x.JPEG", 9))
    write_set(tmp_path / "imagenet_lt", lists, images=False)
    test = tmp_path / "imagenet_lt" / "ImageNet_LT_test.txt"
    test.write_text(test.read_text()[:-1])              # cut short: no final newline
    os.makedirs(tmp_path / "imagenet_lt" / "images")
    rc, out, err = dry_run(capsys, INLT, "data.num_classes=4")
    lines = err.strip().splitlines()
    assert rc == 2 and all(line.startswith("data error: ") for line in lines), err
    text = "\n".join(lines)
    assert "last line has no newline" in text
    assert re.search(r"labels out of range .*ImageNet_LT_val.txt:5: label 9", text)
    assert re.search(r"train list \S+: 1 of 4 classes have no image: 2;.*data.classes", text)
    assert "holds none of the" in text and len(lines) >= 4
    assert "crt: global batch 512" in out                 # the plan came first
    # data.check_files: true is read: every listed image is stat'ed, not a sample
    write_set(tmp_path / "imagenet_lt", imagenet_lt_lists(4))
    rc, out, err = dry_run(capsys, INLT, "data.num_classes=4", "data.check_files=true")
    assert rc == 0, err
    assert "checked 18 of 18 listed images" in out       # 10 train, 4 val, 4 test


def test_required_keys_are_reported_together(tmp_path):
    from ltrainer.trainer.config import ConfigError, load_config
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  source: list\n" + "".join(f"  {k}: ???\n" for k in (
        "root", "train_list", "val_list", "test_list")))
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert re.search(r"r\.yaml: data\.root, data\.train_list, data\.val_list and "
                     r"data\.test_list are required; set them in the config or on the command "
                     r"line \(data\.root=\.\.\. data\.train_list=\.\.\.", str(e.value))


# ------------------------------------------------------------------ build 2: the plan

def test_plan_prints_batch_lr_steps_and_crt_samples_even_without_images(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("LTRAINER_DATA", str(tmp_path))
    write_set(tmp_path / "imagenet_lt", imagenet_lt_lists(1000), images=False)
    # the config's cRT is the reference's (docs/fidelity.md): epochs of N / batch steps
    rc, out, err = dry_run(capsys, INLT, "data.batch_size=64", "crt.data.batch_size=500")
    assert ("crt: global batch 500, lr 0.195312 (optim.lr 0.2 x batch 500 / optim.ref_batch "
            "512), 10 epochs; 6 steps x batch 500 = 3,000 samples per epoch (class-aware-cyclic: "
            "the 3,000 training images)") in out
    rc, out, err = dry_run(capsys, INLT, "data.batch_size=64", "crt.data.batch_size=500",
                           "crt.classifier.sampler=class_aware", "crt.data.class_aware_epoch=max_count")
    assert rc == 2 and "holds none of the" in err or "folder not found" in err
    # 1,000 classes with 1..5 images: 3,000 training images; cRT draws 1,000 x 5 per epoch
    assert ("ce: global batch 64, lr 0.1 (optim.lr 0.2 x batch 64 / optim.ref_batch 128), "
            "90 epochs; 46 steps x batch 64 = 3,000 samples per epoch") in out
    assert ("crt: global batch 500, lr 0.195312 (optim.lr 0.2 x batch 500 / optim.ref_batch "
            "512), 10 epochs; 10 steps x batch 500 = 5,000 samples per epoch (class-aware: "
            "1,000 classes x max 5 per class)") in out
    assert "pretrain: global batch 64, lr 0.0075 (optim.lr 0.03 x batch 64 / optim.ref_batch " \
           "256)" in out
    # no lists at all: the plan is still printed, then every problem
    monkeypatch.setenv("LTRAINER_DATA", str(tmp_path / "nothing"))
    rc, out, err = dry_run(capsys, INLT)
    assert rc == 2 and "steps per epoch unknown: data missing" in out
    assert len([l for l in err.splitlines() if "file not found" in l]) == 3
    assert "$LTRAINER_DATA/imagenet_lt/ImageNet_LT_{train,val,test}.txt" in err


# ------------------------------------------------------------------ finding 7: lr scaling

def test_linear_lr_scaling_from_the_reference_batch():
    """optim.lr is for optim.ref_batch: batch 32 with ref 256 trains at lr x 1/8, and the
    run's first log line says so; null (the default) keeps the lr as given."""
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.optim import build_optimizer, describe_lr
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"),
                      ["optim.lr=0.2", "optim.ref_batch=256", "data.batch_size=32"])
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(cfg.optim, [{"params": params}], torch.device("cpu"),
                          cfg.data.batch_size)
    assert opt.param_groups[0]["base_lr"] == pytest.approx(0.2 / 8)
    assert describe_lr(cfg.optim, 32) == "lr 0.025 (optim.lr 0.2 x batch 32 / optim.ref_batch 256)"
    plain = load_config(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"), ["optim.lr=0.2"])
    assert plain.optim.ref_batch is None
    opt = build_optimizer(plain.optim, [{"params": params}], torch.device("cpu"), 32)
    assert opt.param_groups[0]["base_lr"] == pytest.approx(0.2)


@needs_fmnist
def test_the_engine_trains_at_the_scaled_lr_and_logs_it(tmp_path, small_test_list):
    """The lr of the metrics (what the optimizer steps with) and the first log line."""
    from ltrainer.launchers.train import launch, prepare
    plan = prepare(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"), [
        f"run.out_dir={tmp_path}", "data.n_max=20", "data.rho=2", "data.batch_size=32",
        "model.name=resnet8", "sched.epochs=1", "sched.warmup_epochs=0", "sched.name=constant",
        "optim.lr=0.2", "optim.ref_batch=256", "engine.max_steps=2", "engine.log_every=1",
        "eval.every_epochs=0", "engine.progress=none", "data.eval_batch_size=300",
        f"data.test_list={small_test_list}"])
    launch(plan)
    log = open(os.path.join(plan[0].run_dir, "run.log")).read()
    assert "batch 32, lr 0.025 (optim.lr 0.2 x batch 32 / optim.ref_batch 256)" in log
    records = [json.loads(l) for l in open(os.path.join(plan[0].run_dir, "metrics.jsonl"))]
    assert [r["lr"] for r in records if r["kind"] == "train"][0] == pytest.approx(0.025)


def test_paper_configs_state_their_reference_batch_and_split_over_8_and_32_gpus(monkeypatch):
    monkeypatch.setenv("LTRAINER_DATA", "/data")
    from ltrainer.trainer.pipeline import check_world, load_plan
    from ltrainer.trainer.optim import scaled_lr
    for config in ("inat_moco_crt.yaml", "inat_ce.yaml", "imagenet_lt_moco_crt.yaml",
                   "imagenet_lt_ce.yaml", "imagenet_lt_ce_balanced.yaml"):
        plan = load_plan(os.path.join(ROOT, "configs", config))
        assert all(s.cfg.optim.ref_batch for s in plan), config
        for world in (8, 32):
            check_world(plan, world, f"{world} GPUs")
    ce = load_plan(INAT, ["ce.data.batch_size=200"])[1].cfg      # recipe: lr 0.2 at batch 100
    assert scaled_lr(ce.optim, ce.data.batch_size) == pytest.approx(0.4)


# ------------------------------------------------------------------ finding 1: empty classes

def test_classes_without_training_images_are_named_unless_the_method_does_without(
        tmp_path, capsys, monkeypatch):
    from ltrainer.data_pipelines.sources import DataError
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.methods import check_every_class
    counts = [5, 0, 3] + [0] * 997
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"),
                      ["train_rule.name=drw"])
    with pytest.raises(DataError) as e:
        check_every_class(cfg, counts)
    msg = str(e.value)
    assert msg.startswith("998 of 1,000 classes have no training image (class ids 1, 3, 4, ")
    assert "train_rule.name = 'drw'" in msg and "data.classes" in msg and len(msg) < 600
    for ok in ([], ["method.name=moco", "data.augment=moco"]):   # plain CE; MoCo: no labels
        check_every_class(load_config(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"), ok),
                          counts)
    sub = load_config(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"),
                      ["loss.name=balanced_softmax", "data.classes=[7, 8, 9]"])
    with pytest.raises(DataError, match=r"1 of 3 classes .*\(class ids 8\) and loss.name = "
                                        r"'balanced_softmax' is built from the class counts"):
        check_every_class(sub, [4, 0, 1])
    # plain CE really trains with an empty class (the CB weights it never uses are not built)
    from ltrainer.trainer.methods import create_method

    class Data:
        num_classes, in_channels, class_counts = 3, 1, [4, 0, 1]
    plain = load_config(os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml"), ["model.name=resnet8"])
    method = create_method(plain, Data(), torch.device("cpu"))
    assert method.on_epoch_start(0).kind == "uniform"
    # --dry-run: the cRT stage needs every class, so the empty class is a problem there
    monkeypatch.setenv("LTRAINER_DATA", str(tmp_path))
    lists = imagenet_lt_lists(4)
    lists["ImageNet_LT_train.txt"] = [l for l in lists["ImageNet_LT_train.txt"] if l[1] != 1]
    write_set(tmp_path / "imagenet_lt", lists)
    rc, out, err = dry_run(capsys, INLT, "data.num_classes=4")
    assert rc == 2 and "1 of 4 classes have no image: 1;" in err
    assert "stages 'pretrain', 'ce', 'crt'" in err
    rc, out, err = dry_run(capsys, INLT, "data.num_classes=4", "ce.method.name=moco",
                           "crt.method.name=moco", "crt.model.init=null", "ce.model.init=null",
                           "data.augment=moco")
    assert rc == 0 and "(the method trains without them)" in out, err


# ------------------------------------------------------------------ finding 5: iNat on val

def test_inat_configs_evaluate_on_val_without_a_test_list(monkeypatch):
    monkeypatch.setenv("LTRAINER_DATA", "/data")
    from ltrainer.trainer.pipeline import load_plan
    for config in ("inat_moco_crt.yaml", "inat_ce.yaml"):
        text = open(os.path.join(ROOT, "configs", config)).read()
        assert "no test split" in text
        for stage in load_plan(os.path.join(ROOT, "configs", config)):
            assert stage.cfg.eval.split == "val" and stage.cfg.data.test_list is None


# ------------------------------------------------------------------ finding 6: threads

def test_threads_and_workers_follow_the_allocation(monkeypatch):
    from ltrainer.data_pipelines import cpus
    from ltrainer.trainer import engine
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE",
                 "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpus.cpus_per_process() == 16 and cpus.cpus_per_process(4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpus.cpus_per_process() == 2 and cpus.loader_workers(8) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpus.cpus_per_process() == 6 and cpus.loader_workers(8) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "3")   # torch threads; workers keep Slurm's budget
    assert cpus.cpus_per_process() == 3 and cpus.loader_workers(8) == 5
    from ltrainer.data_pipelines.loaders import _threads   # DALI / FFCV threads: the same budget
    monkeypatch.setenv("OMP_NUM_THREADS", "1")    # as torchrun sets it
    assert _threads({"workers": 8, "dali_threads": 0}, "dali_threads") == 6
    assert _threads({"workers": 0, "dali_threads": 0}, "dali_threads") == 6
    assert _threads({"workers": 8, "dali_threads": 3}, "dali_threads") == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpus.loader_workers(8) == 0 and cpus.loader_workers(0) == 0
    # engine.threads: 0 takes that budget, a number is taken as given
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.distributed import DistInfo
    got = []
    monkeypatch.setattr(torch, "set_num_threads", got.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    info = DistInfo(device=torch.device("cpu"), local_world_size=2)
    engine.configure_runtime(load_config(None), info)
    engine.configure_runtime(load_config(None, ["engine.threads=5"]), info)
    assert got == [3, 5]


# ------------------------------------------------------------------ finding 10: data location

def test_inat_dry_run_as_typed_with_ltrainer_data(tmp_path, capsys, monkeypatch):
    """`--dry-run configs/inat_moco_crt.yaml` with no data.* overrides: passes on a tiny
    iNat-shaped set (8,142 classes, the lists from tools/make_synthetic_lt.py) under
    $LTRAINER_DATA; unset or pointing elsewhere, the error names the variable and the layout."""
    run_cli("tools/make_synthetic_lt.py", "--out", str(tmp_path / "inat2018"), "--profile",
            "inat2018", "--max-per-class", "1", "--lists-only")
    data = _jpeg()
    for name in ("iNaturalist18_train.txt", "iNaturalist18_val.txt"):
        for line in open(tmp_path / "inat2018" / name):
            path = tmp_path / "inat2018" / "images" / line.split()[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    monkeypatch.setenv("LTRAINER_DATA", str(tmp_path))
    rc, out, err = dry_run(capsys, INAT)
    assert rc == 0, err
    assert "8,142 of 8,142 classes" in out and "evaluates on val" in out
    from ltrainer.launchers import submit    # as users type it (here without a cluster: --local)
    assert submit.main(["--nodes", "4", "--local", "--dry-run", INAT]) == 0
    out = capsys.readouterr().out
    assert "crt: global batch 512" in out and "4 node(s) x 1 task(s) (4 ranks" in out
    monkeypatch.delenv("LTRAINER_DATA")
    rc, out, err = dry_run(capsys, INAT)
    assert rc == 2 and "the environment variable LTRAINER_DATA is not set" in err
    assert "data.root = '${LTRAINER_DATA}/inat2018/images'" in err
    assert "data.train_list = '${LTRAINER_DATA}/inat2018/iNaturalist18_train.txt'" in err
    monkeypatch.setenv("LTRAINER_DATA", str(tmp_path / "elsewhere"))
    rc, out, err = dry_run(capsys, INAT)
    assert rc == 2 and "folder not found" in err
    assert "$LTRAINER_DATA/inat2018/images/ (holding train_val2018/)" in err


def test_env_substitution_is_generic_with_defaults(tmp_path, monkeypatch):
    from ltrainer.trainer.config import ConfigError, load_config
    path = tmp_path / "e.yaml"
    path.write_text("run: {out_dir: '${LTT_X}/runs', name: '${LTT_Y:-plain}'}\n")
    monkeypatch.delenv("LTT_Y", raising=False)
    monkeypatch.setenv("LTT_X", "/somewhere")
    cfg = load_config(str(path))
    assert (cfg.run.out_dir, cfg.run.name) == ("/somewhere/runs", "plain")
    monkeypatch.delenv("LTT_X")
    with pytest.raises(ConfigError, match=r"e\.yaml: the environment variable LTT_X is not set "
                                          r"\(run\.out_dir = '\$\{LTT_X\}/runs'\)"):
        load_config(str(path))
    assert load_config(str(path), ["run.out_dir=/x"]).run.out_dir == "/x"   # overridden


# ------------------------------------------------------------------ finding 4: write_beton

def test_write_beton_of_a_config_with_stages(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ffcv")
    from ltrainer.tools.write_beton import main
    monkeypatch.setenv("LTRAINER_DATA", str(tmp_path))
    write_set(tmp_path / "imagenet_lt", imagenet_lt_lists(3, lambda c: 2))
    rc = main(["--config", INLT, "data.num_classes=3", f"data.beton_dir={tmp_path / 'b'}",
               "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    written = sorted(os.listdir(tmp_path / "b"))
    assert len([f for f in written if f.endswith(".beton")]) == 2, written   # train, test
    assert "stage 'pretrain' train: writing 6 images" in out
    assert "stage 'pretrain' test: writing 3 images" in out
    assert "stage 'ce'" not in out          # the same data sets: written once


# ------------------------------------------------------------------ lists parsed once per job

def _list_config(tmp_path, label: int) -> str:
    wn = [f"n{c:08d}" for c in range(3)]
    lines = [(f"train/{wn[c]}/{wn[c]}_{k}.JPEG", c) for c in range(3) for k in range(4)]
    test = [(p.replace("train/", "val/"), y) for p, y in lines]
    write_set(tmp_path, {"train.txt": lines, "test.txt": test[:-1] + [(test[-1][0], label)]})
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{source: list, root: {tmp_path / 'images'}, num_classes: 3, "
                    f"train_list: {tmp_path / 'train.txt'}, test_list: {tmp_path / 'test.txt'}, "
                    f"stats: imagenet, augment: imagenet, image_size: 32, batch_size: 4}}\n"
                    f"model: {{name: resnet8}}\nsched: {{epochs: 1, warmup_epochs: 0}}\n"
                    f"run: {{out_dir: {tmp_path / 'runs'}}}\n")
    return str(path)


def test_only_rank_0_of_a_job_checks_the_lists(tmp_path, monkeypatch):
    """Under torchrun every rank runs main(): the lists are parsed by rank 0 alone."""
    from ltrainer.launchers import train as train_cli
    path = _list_config(tmp_path, label=2)
    seen = []
    real = train_cli.check_plan_data
    monkeypatch.setattr(train_cli, "check_plan_data", lambda plan: seen.append(1) or real(plan))
    monkeypatch.setenv("WORLD_SIZE", "1")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        plan = train_cli.check_data_once(path, [])
        assert plan[0].cfg.data.num_classes == 3
    assert seen == [1]


def test_bad_data_found_by_rank_0_stops_every_rank(tmp_path):
    """Two ranks as torchrun starts them: rank 0 finds a label out of range, both exit 2 at
    once (rank 1 learns the verdict through the process group rather than waiting for a
    peer that left)."""
    import subprocess
    import sys
    import time
    from ltrainer.trainer.distributed import free_port
    path = _list_config(tmp_path, label=7)
    env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "launchers/train.py", path], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert "data error: " in outs[0][1] and "label" in outs[0][1] and "7" in outs[0][1], outs
    assert "rank 0 found problems in the data" in outs[1][1]
    assert time.time() - start < 100 and not (tmp_path / "runs").exists()
