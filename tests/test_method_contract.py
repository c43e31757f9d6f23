"""The method contract (trainer/methods/base.py), for every registered method at once: build it
through the engine on tiny Fashion-MNIST-LT data, take three steps, SIGKILL the run after step
2 (a method that does not train: during its final evaluation), resume, and end bit-identical
to an uninterrupted run (weights, the method's own state, the pool position, the metrics).
A new method file joins the parametrisation by registering itself; one the generic recipe
below cannot configure fails here, naming the override it needs in EXTRA."""
import ast
import glob
import json
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import ROOT, needs_fmnist, tiny_overrides
from ltrainer.trainer import checkpoint as ckpt
from ltrainer.trainer.config import ConfigError, load_config
from ltrainer.trainer.methods import METHODS
from ltrainer.trainer.methods.classifier_base import FrozenBackbone

CE = os.path.join(ROOT, "configs", "fmnist_lt_ce.yaml")
POOL = ["semi.size=1", "semi.rho_u=10", "semi.unlabeled_ratio=0.5"]
# What the generic recipe (contract_overrides) cannot derive from a method's class.
EXTRA = {
    "moco": ["data.augment=moco", "moco.queue=64", "moco.dim=16"],
    "crt+cache": ["data.augment=none", "classifier.cache_features=true"],
}
CASES = sorted(METHODS) + ["crt+cache"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_test_list):
    """A stage-1 checkpoint (an untrained MLP: the contract does not need a good one) and the
    pseudo-labels of the pool the semi methods use."""
    from ltrainer.data_pipelines.unlabeled_pool import build_pool
    from ltrainer.trainer import pseudo_labels
    from ltrainer.trainer.models import create_model
    d = tmp_path_factory.mktemp("contract_inputs")
    torch.manual_seed(0)
    torch.save(create_model("mlp", 10, in_channels=1, image_size=28).state_dict(), d / "init.pt")
    cfg = load_config(CE, tiny_overrides(d, small_test_list) + POOL)
    pool = build_pool(cfg.data, cfg.semi)
    probs = np.random.RandomState(0).dirichlet(np.ones(pool.num_classes), len(pool))
    pseudo_labels.save(str(d / "pl.npz"), pseudo_labels.from_probs(
        probs, pool.hidden, pool_fingerprint=pool.fingerprint))
    return {"init": str(d / "init.pt"), "pl": str(d / "pl.npz"), "lists": small_test_list}


def contract_overrides(case: str, inputs) -> list[str]:
    """A tiny config of `case` from what its class declares."""
    name = case.split("+")[0]
    cls = METHODS[name]
    over = [f"method.name={name}", "model.name=mlp", "engine.max_steps=3",
            "checkpoint.every_steps=1", "eval.every_epochs=0", "engine.log_every=1"]
    if issubclass(cls, FrozenBackbone) or not cls.trains:
        over.append(f"model.init={inputs['init']}")   # starts from an earlier stage
    if getattr(cls, "needs_trained_head", False) or not cls.trains:
        over.append("model.init_head=true")
    if not cls.trains:
        over += ["sched.epochs=0", "sched.warmup_epochs=0", "data.val_per_class=5"]
    if cls.reads_pool:
        over += POOL
    if cls.uses_pseudo_labels:
        over.append(f"semi.pseudo_labels={inputs['pl']}")
    return over + EXTRA.get(case, [])


def _attempt(cfg, spec):
    from tests import kill_points
    from ltrainer.trainer.engine import train
    kill_points.install(spec)
    train(cfg)


def records(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@needs_fmnist
@pytest.mark.parametrize("case", CASES)
def test_three_steps_killed_and_resumed_end_bit_identical(case, inputs, tmp_path):
    from ltrainer.trainer.engine import Trainer, train
    try:
        cfg = lambda run: load_config(CE, tiny_overrides(tmp_path, inputs["lists"])
                                      + contract_overrides(case, inputs) + [f"run.name={run}"])
        ref_cfg = cfg("ref")
    except ConfigError as e:
        pytest.fail(f"method {case!r}: the generic recipe does not configure it; add its "
                    f"overrides to EXTRA in tests/test_method_contract.py ({e})")
    cls = METHODS[case.split("+")[0]]
    train(ref_cfg)
    spec = "kill:step:2" if cls.trains else "kill:eval:1"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["ltrainer.trainer.engine", "tests.kill_points"])
    p = ctx.Process(target=_attempt, args=(cfg("killed"), spec))
    p.start()
    p.join(300)
    assert p.exitcode == -signal.SIGKILL, f"{case}: the attempt was not killed ({p.exitcode})"
    assert os.path.exists(tmp_path / "killed" / ckpt.LAST)
    trainer = Trainer(cfg("killed"))     # the contract, as the engine sees it
    assert isinstance(trainer.method, nn.Module)
    assert not hasattr(trainer.method, "trainer") and not hasattr(trainer.method, "global_step")
    trainer.fit()
    trainer.log.close()
    assert "resumed from" in (tmp_path / "killed" / "run.log").read_text()
    load = lambda run, f: torch.load(tmp_path / run / f, weights_only=True)
    a, b = load("ref", "model_final.pt"), load("killed", "model_final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case
    sa, sb = load("ref", ckpt.LAST), load("killed", ckpt.LAST)
    assert sa["method"].keys() == sb["method"].keys()
    for k, v in sa["method"].items():
        assert torch.equal(v, sb["method"][k]) if torch.is_tensor(v) else v == sb["method"][k], k
    assert sa.get("unlabeled") == sb.get("unlabeled")
    assert sa["progress"]["global_step"] == (3 if cls.trains else 0)
    drop = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]
    assert drop(records(tmp_path / "ref")) == drop(records(tmp_path / "killed"))


# ---------------------------------------------------------------------- state and imports

def _moco():
    from types import SimpleNamespace
    cfg = load_config(None, ["model.name=mlp", "data.image_size=28", "moco.queue=16",
                             "moco.dim=8", "data.batch_size=8", "data.augment=moco",
                             "method.name=moco"])
    data = SimpleNamespace(world_size=1, rank=0, in_channels=1, num_classes=10,
                           class_counts=[1] * 10)
    return METHODS["moco"](cfg, data, torch.device("cpu"))


def test_module_state_replaces_the_hand_written_one():
    """MoCo's queue is a buffer and its key encoder a submodule, saved by nn.Module; the
    checkpoint keeps the model's tensors once, under 'model'."""
    m = _moco()
    assert "queue" in dict(m.named_buffers()) and "key_model" in dict(m.named_children())
    state = ckpt.method_state(m)
    assert not any(k.startswith("model.") for k in state)
    assert state["_extra_state"] == {"queue_ptr": 0}
    assert any(k.startswith("key_model.") for k in state)


def test_a_checkpoint_of_the_hand_written_format_still_resumes():
    """Before methods were modules, MoCo wrote {'key_model': {...}, 'queue', 'queue_ptr'} and
    the semi methods their pool position into the method's entry."""
    old = _moco()
    with torch.no_grad():
        old.queue.normal_()
        for p in old.key_model.parameters():
            p.add_(1.0)
    legacy = {"model": old.model.state_dict(), "method": {
        "key_model": old.key_model.state_dict(), "queue": old.queue.clone(), "queue_ptr": 5,
        "unlabeled_epoch": 1, "unlabeled_batch": 3}}
    new = _moco()
    unlabeled = ckpt.load_method_state(new, legacy, "old.pt")
    assert new.queue_ptr == 5 and torch.equal(new.queue, old.queue)
    assert all(torch.equal(a, b) for a, b in zip(new.key_model.state_dict().values(),
                                                 old.key_model.state_dict().values()))
    assert unlabeled == {"unlabeled_epoch": 1, "unlabeled_batch": 3}


def test_a_method_state_of_another_method_fails_in_words():
    m = _moco()
    with pytest.raises(RuntimeError, match=r"x\.pt: its method state does not fit method "
                                           r"'moco' \(missing 7 keys \['key_model\."):
        ckpt.load_method_state(m, {"method": {"_extra_state": {"queue_ptr": 0}}}, "x.pt")


def test_no_method_imports_data_pipelines_or_another_method():
    """A method file imports the registry, the base classes of its family and trainer
    modules, never the data code (the engine serves what it declares) nor a sibling."""
    bases = {"base", "registry", "supervised_base", "classifier_base", "ssl_base", "semi_base"}
    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "trainer", "methods", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name in ("__init__", "registry"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")]
                if node.level == 1 and not node.module:   # from . import x
                    mods = ["." + a.name for a in node.names]
            for mod in mods:
                sibling = mod.startswith(".") and not mod.startswith("..") and \
                    mod[1:].split(".")[0] not in bases
                if mod.startswith(("data_pipelines", "ltrainer.data_pipelines", "...data_pipelines")) \
                        or sibling:
                    bad.append(f"{name}.py imports {mod}")
    assert not bad, bad
