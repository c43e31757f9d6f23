"""Weight transfer and the stage-2 methods (cRT, LWS, tau-norm, NCM) on tiny data."""
import os

import pytest
import torch
import torchvision

from ltrainer.data_pipelines.sources import DataError
from tests.conftest import ROOT, needs_fmnist
from ltrainer.trainer.config import ConfigError, load_config
from ltrainer.trainer.models import create_model
from ltrainer.trainer.transfer import load_pretrained

CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")


def test_import_torchvision_and_moco_formats(tmp_path):
    tv = torchvision.models.resnet18(num_classes=7)
    sd = tv.state_dict()
    torch.save(sd, tmp_path / "tv.pth")
    moco = {"state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")},
            "epoch": 200, "arch": "resnet18"}
    moco["state_dict"].update({"module.encoder_q.fc.0.weight": torch.randn(512, 512),
                               "module.encoder_q.fc.2.weight": torch.randn(128, 512),
                               "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7),
                               "queue": torch.randn(128, 16)})
    torch.save(moco, tmp_path / "moco.pth.tar")
    for name, fmt in (("tv.pth", "torchvision"), ("moco.pth.tar", "moco")):
        model = create_model("resnet18", num_classes=10)
        msg = load_pretrained(model, str(tmp_path / name))
        assert fmt in msg
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_mismatched_architecture_lists_keys(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError) as e:
        load_pretrained(create_model("resnet50", num_classes=10), str(tmp_path / "r18.pth"))
    msg = str(e.value)
    assert "missing keys: " in msg and "unexpected keys: " in msg or "shape mismatches" in msg
    assert "r18.pth" in msg
    with pytest.raises(DataError, match="no such file or run folder"):
        load_pretrained(create_model("resnet8", 10), str(tmp_path / "nothing"))


def test_frozen_methods_require_init():
    with pytest.raises(ConfigError, match="set model.init"):
        load_config(CE, ["method.name=crt"])
    with pytest.raises(ConfigError, match="set model.init_head: true"):
        load_config(CE, ["method.name=lws", "model.init=x"])
    with pytest.raises(ConfigError, match="set sched.epochs: 0"):
        load_config(CE, ["method.name=ncm", "model.init=x"])


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, small_test_list):
    """A short CE run whose weights the stage-2 methods start from (trained once)."""
    from tests.conftest import tiny_overrides
    from ltrainer.trainer.engine import train
    out = tmp_path_factory.mktemp("stage1")
    cfg = load_config(CE, tiny_overrides(out, small_test_list) + [
        "run.name=stage1", "sched.epochs=2", "data.val_per_class=20"])
    train(cfg)
    return str(out / "stage1"), torch.load(out / "stage1" / "model_final.pt", weights_only=True)


def run_stage2(tiny, stage1_dir, name, *over):
    from ltrainer.trainer.engine import train
    cfg = load_config(CE, tiny + [f"run.name={name}", f"model.init={stage1_dir}",
                                  "data.val_per_class=20", "sched.warmup_epochs=0", *over])
    res = train(cfg)
    final = torch.load(os.path.join(cfg.run.out_dir, name, "model_final.pt"), weights_only=True)
    return res, final


def backbone_of(sd):
    return {k: v for k, v in sd.items() if k.startswith("backbone.")}


@needs_fmnist
def test_crt_trains_only_the_classifier(tiny, stage1):
    path, init = stage1
    res, final = run_stage2(tiny, path, "crt", "method.name=crt", "sched.epochs=1",
                            "data.augment=none", "classifier.cache_features=true")
    for k, v in backbone_of(init).items():                 # weights and BN statistics
        assert torch.equal(v, final[k]), k
    assert not torch.equal(init["head.fc.weight"], final["head.fc.weight"])
    assert res["global_step"] == (100 * 10) // 32              # class-aware epoch: max count x C


@needs_fmnist
def test_lws_learns_only_scales(tiny, stage1):
    path, init = stage1
    res, final = run_stage2(tiny, path, "lws", "method.name=lws", "model.init_head=true",
                            "sched.epochs=1")
    scales = torch.tensor(res["lws_scales"])
    assert not torch.allclose(scales, torch.ones(10))
    torch.testing.assert_close(final["head.fc.weight"], init["head.fc.weight"] * scales[:, None],
                               rtol=1e-4, atol=1e-6)
    for k, v in backbone_of(init).items():
        assert torch.equal(v, final[k]), k


@needs_fmnist
def test_tau_norm_chooses_tau_on_validation(tiny, stage1):
    path, init = stage1
    res, final = run_stage2(tiny, path, "tau", "method.name=tau_norm", "model.init_head=true",
                            "sched.epochs=0", "tau_norm.grid=[0.0, 1.0, 2.0]")
    assert set(res["tau_search"]) == {"0", "1", "2"}
    tau = res["tau"]
    assert res["tau_search"][f"{tau:g}"] == max(res["tau_search"].values())
    w = init["head.fc.weight"]
    torch.testing.assert_close(final["head.fc.weight"], w / w.norm(dim=1, keepdim=True) ** tau)


@needs_fmnist
def test_ncm_uses_class_means(tiny, stage1):
    path, _ = stage1
    res, final = run_stage2(tiny, path, "ncm", "method.name=ncm", "sched.epochs=0")
    norms = final["head.fc.weight"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10))
    assert torch.equal(final["head.fc.bias"], torch.zeros(10))
    assert 0 <= res["balanced_error"] < 90


@needs_fmnist
def test_crt_reference_options(tiny, stage1):
    """classifier-balancing's cRT: cyclic class-aware sampling (4 images per visit), epochs of
    N samples, the frozen backbone's BatchNorm in train mode (its statistics move, its
    weights do not)."""
    path, init = stage1
    res, final = run_stage2(tiny, path, "crt_ref", "method.name=crt", "sched.epochs=1",
                            "classifier.sampler=class_aware_cyclic", "data.samples_per_class=4",
                            "data.class_aware_epoch=dataset", "classifier.backbone_bn=train")
    from ltrainer.data_pipelines.longtail import lt_counts
    n = sum(lt_counts(10, 100, 10))                           # tiny: n_max 100, rho 10: 403
    assert res["global_step"] == n // 32                      # N / batch steps, as its loop
    moved = [k for k, v in backbone_of(init).items() if "running_" in k and not torch.equal(v, final[k])]
    assert moved
    for k, v in backbone_of(init).items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, final[k]), k


@needs_fmnist
def test_tau_norm_without_bias_and_ncm_centered(tiny, stage1):
    path, init = stage1
    res, final = run_stage2(tiny, path, "tau_nobias", "method.name=tau_norm",
                            "model.init_head=true", "sched.epochs=0", "tau_norm.bias=false",
                            "tau_norm.grid=[0.0, 1.0]")
    assert torch.equal(final["head.fc.bias"], torch.zeros(10))
    res, final = run_stage2(tiny, path, "ncm_l2", "method.name=ncm", "sched.epochs=0",
                            "classifier.ncm_metric=centered_l2")
    norms = final["head.fc.weight"].norm(dim=1)
    assert (norms <= 1 + 1e-5).all() and (norms < 1 - 1e-3).any()   # means of unit vectors
    assert not torch.equal(final["head.fc.bias"], torch.zeros(10))  # -c . center
    assert 0 <= res["balanced_error"] < 90


@needs_fmnist
def test_reference_crt_killed_resumes_bit_identical(tiny, stage1, tmp_path):
    """The cyclic sampler's window and the moving BatchNorm statistics resume exactly."""
    import signal

    from tests.conftest import run_cli
    path, _ = stage1
    args = [os.path.join(ROOT, "launchers", "train.py"), CE, *tiny, f"run.out_dir={tmp_path}",
            f"model.init={path}", "method.name=crt", "sched.epochs=2", "sched.warmup_epochs=0",
            "eval.every_epochs=2", "classifier.sampler=class_aware_cyclic",
            "data.samples_per_class=4", "data.class_aware_epoch=dataset",
            "classifier.backbone_bn=train", "checkpoint.every_steps=4"]
    run_cli(*args, "run.name=ref")
    proc = run_cli(*args, "run.name=killed", env={"LTT_KILL_AT_STEP": "15"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "resumed from" in run_cli(*args, "run.name=killed").stdout
    ref = torch.load(tmp_path / "ref" / "model_final.pt", weights_only=True)
    got = torch.load(tmp_path / "killed" / "model_final.pt", weights_only=True)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
