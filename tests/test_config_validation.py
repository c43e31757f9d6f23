"""Issue 11 finding 4 and item 4: every name and value is checked before anything runs, by the
part of the code that owns it; --dry-run runs the complete validation, --nproc and the world
size included (issue 18 item 3)."""
import math
import os
import re
import textwrap

import pytest
import torch

from ltrainer.launchers import train as train_cli
from ltrainer.trainer import config as config_module
from ltrainer.trainer.config import ConfigError, load_config
from ltrainer.trainer.pipeline import load_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tmp_path, name: str, more: str = "") -> str:
    """A small config whose data root exists, so --dry-run gets past the paths."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        run: {{name: {name}, out_dir: {tmp_path}/runs}}
        data: {{root: {tmp_path}, n_max: 100, rho: 10, batch_size: 64}}
        model: {{name: resnet8}}
        sched: {{epochs: 2, warmup_epochs: 0, milestones: [1]}}
    """) + textwrap.dedent(more))
    return str(path)


@pytest.fixture
def cfg_file(tmp_path):
    return write_config(tmp_path, "c")


def dry_run(capsys, *argv):
    rc = train_cli.main([*argv, "--dry-run"])
    return rc, capsys.readouterr().err


# Each value of finding 4 (all passed --dry-run before) and the key the error must name.
FINDING_4 = [
    (["method.name=mocco"], r"method\.name = 'mocco' is not allowed.*did you mean 'moco'\?"),
    (["model.name=resnet33"], r"model\.name = 'resnet33' is not allowed.*did you mean 'resnet32'"),
    (["optim.lr=-0.1"], r"optim\.lr = -0\.1 must be > 0"),
    (["engine.log_every=0"], r"engine\.log_every = 0 must be >= 1"),
    (["data.image_size=0"], r"data\.image_size = 0 must be >= 1"),
    (["engine.threads=-3"], r"engine\.threads = -3 must be >= 0"),
    (["data.workers=-1"], r"data\.workers = -1 must be >= 0"),
    (["data.n_max=-5"], r"data\.n_max = -5 must be >= 1 \(or null\)"),
    (["method.name=moco", "data.augment=moco", "moco.queue=0"], r"moco\.queue = 0 must be >= 1"),
    (["run.seed=-1"], r"run\.seed = -1 must be >= 0"),
    (["data.n_max=50", "data.rho=100"], r"data\.n_max = 50 with data\.rho = 100 leaves the "
                                        r"smallest class with no image"),
    (["optim.momentum=5"], r"optim\.momentum = 5 must lie in \[0, 1\)"),
    (["checkpoint.every_steps=-1"], r"checkpoint\.every_steps = -1 must be >= 0"),
    (["run.name=../../x"], r"run\.name = '\.\./\.\./x' must be a relative folder name"),
    (["run.name=/tmp/x"], r"run\.name = '/tmp/x' must be a relative folder name"),
    (["data.stats=imagenett"], r"data\.stats = 'imagenett'.*did you mean 'imagenet'"),
    (["loss.name=balanced_sofmax"], r"did you mean 'balanced_softmax'"),
    (["train_rule.name=drww"], r"train_rule\.name = 'drww'.*did you mean 'drw'"),
    (["sched.name=cosin"], r"sched\.name = 'cosin'.*did you mean 'cosine'"),
    (["optim.name=adam"], r"optim\.name = 'adam' is not allowed; expected one of 'sgd'"),
    (["data.source=cifar"], r"data\.source = 'cifar'.*did you mean 'cifar10'"),
    (["data.augment=imagnet"], r"data\.augment = 'imagnet'.*did you mean 'imagenet'"),
    (["data.loader=dalli"], r"data\.loader = 'dalli'.*did you mean 'dali'"),
    (["model.small_input=true"], r"model\.small_input is read by the torchvision ResNets"),
    (["optim.nesterov=true", "optim.momentum=0"], r"optim\.nesterov needs optim\.momentum > 0"),
    (["method.name=lws", "model.init=x", "model.init_head=true", "model.head=cosine"],
     r"method 'lws' adjusts a linear classifier; set model\.head: linear"),
]


@pytest.mark.parametrize("over, message", FINDING_4, ids=[" ".join(o) for o, _ in FINDING_4])
def test_dry_run_refuses_bad_values_naming_the_key(cfg_file, capsys, over, message):
    rc, err = dry_run(capsys, cfg_file, *over)
    assert rc == 2 and re.search(message, err), err
    assert err.startswith("config error: ") and err.count("\n") == 1   # one line
    with pytest.raises(ConfigError, match=message):                  # also without the CLI
        load_plan(cfg_file, over)


def test_dry_run_accepts_the_valid_config(cfg_file, capsys):
    assert train_cli.main([cfg_file, "--dry-run"]) == 0


@pytest.mark.parametrize("nproc", ["0", "-3"])
def test_nproc_below_one_is_refused(cfg_file, capsys, nproc):
    rc, err = dry_run(capsys, cfg_file, "--nproc", nproc)
    assert rc == 2 and f"--nproc {nproc} must be >= 1" in err


def test_nproc_above_the_cores_needs_oversubscribe(cfg_file, capsys, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})   # a 2-core machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = dry_run(capsys, cfg_file, "--nproc", "64")
    assert rc == 2 and "--nproc 64 is more than the 2 CPU cores here; pass --oversubscribe" in err
    assert train_cli.main([cfg_file, "--nproc", "64", "--oversubscribe", "--dry-run"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rc, err = dry_run(capsys, cfg_file, "--nproc", "4")
    assert rc == 2 and "--nproc 4 is more than the 2 visible GPUs here" in err


def test_nproc_must_divide_the_batch(cfg_file, capsys, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = dry_run(capsys, cfg_file, "--nproc", "3")
    assert rc == 2 and "data.batch_size = 64 (global) is not divisible by the 3 ranks " \
                       "(--nproc 3)" in err
    assert train_cli.main([cfg_file, "--nproc", "4", "--dry-run"]) == 0


def pipeline_file(tmp_path):
    """MoCo (batch 64) -> CE (batch 100): 8 ranks split the first stage but not the second."""
    return write_config(tmp_path, "p", """
        stages:
          - name: pretrain
            method: {name: moco}
            data: {augment: moco}
            moco: {queue: 128}
          - name: ce
            data: {batch_size: 100}
            model: {init: "@pretrain"}
    """)


def test_world_size_from_torchrun_is_checked_against_every_stage(tmp_path, capsys, monkeypatch):
    """Issue 18 item 3: under torchrun the `ce` stage used to die only after the MoCo stage."""
    path = pipeline_file(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    rc, err = dry_run(capsys, path)
    assert rc == 2 and "stage 'ce': data.batch_size = 100 (global) is not divisible by the " \
                       "8 ranks (WORLD_SIZE from torchrun)" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_cli.main([path, "--dry-run"]) == 0
    assert not (tmp_path / "runs").exists()


def test_submit_checks_every_stage_against_nodes_x_tasks(tmp_path, capsys):
    from ltrainer.launchers import submit
    rc = submit.main(["--local", "--nodes", "8", pipeline_file(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "stage 'ce': data.batch_size = 100 (global) is not divisible by the 8 " \
                       "ranks (8 node(s) x 1 task(s))" in err
    assert submit.main(["--local", "--nodes", "0", pipeline_file(tmp_path), "--dry-run"]) == 2
    assert "command line (--nodes): slurm.nodes = 0 must be >= 1" in capsys.readouterr().err


def test_base_that_is_not_a_file_name(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("_base_: [3]\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: _base_ = \[3\] must be a file name"):
        load_config(str(path))


def test_stage_name_must_be_a_plain_folder(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("stages:\n  - name: ../up\n")
    with pytest.raises(ConfigError, match="stage name '../up' must be a plain folder name"):
        load_plan(str(path))


# ------------------------------------------------------------------------------ the schema

def test_every_numeric_key_declares_a_range():
    missing = [f"{s}.{k}" for s, fields in config_module.schema().sections.items()
               for k, f in fields.items() if f.numeric and not f.has_range]
    assert missing == []


def test_every_name_key_is_checked_against_its_registry():
    from ltrainer.configspec import Registry
    keys = {p.key for p in config_module.schema().parts if isinstance(p, Registry)}
    assert {"method.name", "model.name", "model.head", "loss.name", "train_rule.name",
            "data.source", "data.augment", "data.loader", "optim.name", "sched.name"} <= keys
    for key in keys:
        section, name = key.split(".")
        assert isinstance(config_module.schema().sections[section][name].choices, Registry)


def test_config_py_names_no_component():
    """trainer/config.py is the loader only: no method, loss, model, source, recipe, backend,
    schedule or optimizer name appears in it (each declares itself next to its code)."""
    from ltrainer.configspec import Registry
    with open(os.path.join(ROOT, "trainer", "config.py")) as f:
        text = f.read()
    names = {n for p in config_module.schema().parts if isinstance(p, Registry) for n in p}
    assert len(names) > 30
    names.discard("list")   # the source 'list' shares its name with the field type 'list'
    found = sorted(n for n in names if re.search(rf"""['"]{re.escape(n)}['"]""", text))
    assert found == []
    assert not re.search(r"\b[A-Z_]*(METHODS|SOURCES|LOSSES)\b", text)


# The resolved config's sections and keys before the components declared them (commit
# 76e2852); other code and the run fingerprint read these names.
SHAPE = """run: name out_dir seed deterministic; data: source root train_list val_list test_list
num_classes imbalance rho n_max lt_seed augment image_size stats batch_size eval_batch_size workers
loader beton_dir on_bad_image dali_threads dali_device check_files val_per_class classes; model: name
head small_input channels_last compile init init_head; loss: name focal_gamma ldam_max_m ldam_s
label_smoothing; train_rule: name start_epoch cb_beta sampler; optim: name lr momentum nesterov
weight_decay grad_clip fused; sched: name epochs warmup_epochs milestones gamma min_lr; method: name;
semi: size rho_u relevance seed source root split list irrelevant_source irrelevant_root
irrelevant_split irrelevant_list pool_file pseudo_labels threshold top_k save_probs omega
unlabeled_ratio rampup_epochs counts ema_decay noise vat_xi vat_eps; moco: dim queue momentum
temperature bn_splits; knn: k t; classifier: sampler cache_features reinit; tau_norm: tau grid
split; engine: device amp threads log_every progress max_steps; checkpoint: every_steps; eval:
every_epochs split many few; dist: backend; slurm: partition nodes gpus_per_node cpus_per_task
timeout_min mem_gb signal_delay_s max_num_timeout peer_failure_wait_s account qos constraint
job_name array_parallelism setup additional"""
# Sections new methods added since, each declared by its own file (issue 16).
NEW_SECTIONS = {"logit_adjust", "max_norm", "ema"}


def test_resolved_config_keeps_its_shape():
    cfg = load_config(None).to_dict()
    got = {s: set(v) for s, v in cfg.items()}
    want = {}
    for part in " ".join(SHAPE.split()).split(";"):
        section, keys = part.split(":")
        want[section.strip()] = set(keys.split())
    for section, keys in want.items():   # keys added since (by other issues) may exist too
        assert keys <= got[section], (section, keys - got[section])
    assert set(want) | NEW_SECTIONS == set(got)


def test_a_component_declares_and_checks_its_own_keys():
    """LDAM's rule lives with LDAM and runs only when LDAM is chosen."""
    from ltrainer.trainer.losses import LOSSES
    part = LOSSES.parts["ldam"]
    assert set(part.config["loss"]) == {"ldam_max_m", "ldam_s"}
    with pytest.raises(ConfigError, match="loss.ldam_s = -1 must be > 0"):
        load_config(None, ["loss.ldam_s=-1"])
    load_config(None, ["loss.name=ce", "model.head=linear"])
    with pytest.raises(ConfigError, match="needs a cosine classifier"):
        load_config(None, ["loss.name=ldam", "model.head=linear"])


# ------------------------------------------------------------------------------ Balanced Softmax

def test_balanced_softmax_against_a_hand_computation():
    """Counts [3, 1]: prior [3/4, 1/4]. Logits [1, 2], label 1: the adjusted logits are
    1 + log 3/4 and 2 + log 1/4, so p_1 = e^2/4 / (3e/4 + e^2/4) = e / (3 + e) and the loss is
    log(1 + 3/e). Label 0: p_0 = 3 / (3 + e), loss log(1 + e/3)."""
    from ltrainer.trainer.losses import create_loss
    loss = create_loss("balanced_softmax", [3, 1])
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    per_sample = create_loss("balanced_softmax", [3, 1], reduction="none")(
        logits, torch.tensor([1, 0]))
    assert torch.allclose(per_sample, torch.tensor([math.log(1 + 3 / math.e),
                                                    math.log(1 + math.e / 3)]), atol=1e-6)
    assert torch.isclose(loss(logits, torch.tensor([1, 0])), per_sample.mean())
    # balanced classes: the prior is uniform and the loss is plain cross-entropy
    even = create_loss("balanced_softmax", [5, 5])
    assert torch.isclose(even(logits, torch.tensor([1, 0])),
                         torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0])))
    with pytest.raises(ValueError, match="every class needs at least one training sample"):
        create_loss("balanced_softmax", [3, 0])


def test_balanced_softmax_from_its_config_line():
    cfg = load_config(os.path.join(ROOT, "configs", "fmnist_lt_balanced_softmax.yaml"))
    from ltrainer.trainer.losses import loss_from_config
    from ltrainer.trainer.losses.balanced_softmax import BalancedSoftmaxLoss
    loss = loss_from_config(cfg.loss, [10, 1])
    assert isinstance(loss, BalancedSoftmaxLoss)
    assert torch.allclose(loss.log_prior.exp(), torch.tensor([10 / 11, 1 / 11]))


def test_dry_run_refuses_a_loader_backend_that_cannot_be_imported(cfg_file, capsys, monkeypatch):
    from ltrainer.data_pipelines import loaders
    monkeypatch.setitem(loaders._STATUS, "dali", (False, "ImportError: no module nvidia.dali"))
    rc, err = dry_run(capsys, cfg_file, "data.loader=dali")
    assert rc == 2 and "data.loader = 'dali' but DALI cannot be imported" in err
    assert "pip install nvidia-dali" in err and err.count("\n") == 1


@pytest.mark.parametrize("over, message", [
    (["eval.split=val"], r"eval\.split = 'val': data\.source = 'fashion_mnist' has no 'val' split "
                         r"\(only train, test\); set data\.val_per_class"),
    (["method.name=tau_norm", "model.init=x", "model.init_head=true", "sched.epochs=0"],
     r"tau_norm\.split = 'val': data\.source = 'fashion_mnist' has no 'val' split"),
    (["data.source=list", "data.train_list=a", "data.test_list=b", "data.stats=imagenet",
      "method.name=tau_norm",
      "model.init=x", "model.init_head=true", "sched.epochs=0"],
     r"tau_norm\.split = 'val': data\.source = 'list' has no 'val' split: set data\.val_list"),
])
def test_a_split_the_task_does_not_have_is_refused(cfg_file, over, message):
    """The evaluation splits used to be opened only at start-up (a DataError after --dry-run
    had passed)."""
    with pytest.raises(ConfigError, match=message):
        load_plan(cfg_file, over)
    load_plan(cfg_file, over + ["data.val_per_class=5", "data.val_list=c"])   # now it has one


@pytest.mark.parametrize("over", ["engine.device=cuda", "data.dali_device=gpu"])
def test_a_gpu_asked_for_must_be_visible(cfg_file, capsys, monkeypatch, over):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = dry_run(capsys, cfg_file, over)
    key, value = over.split("=")
    assert rc == 2 and f"{key} = '{value}' but no CUDA device is visible here" in err
