"""CUDA-path defects of the GPU first-contact issue, checked on CPU: deterministic pooling,
float32 similarities under bf16 autocast, pinned torchvision batches, the faiss GPU device,
Slurm rendezvous and device binding. What only a GPU can show is in tools/gpu_check.py."""
import inspect
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltrainer.trainer.models import BACKBONES, CosineHead, create_backbone, create_model
from ltrainer.trainer.models.pooling import GlobalAvgPool


# ------------------------------------------------------------------ item 2: deterministic pool

@pytest.mark.parametrize("name", list(BACKBONES))
def test_no_backbone_uses_adaptive_avg_pool(name):
    """AdaptiveAvgPool2d's CUDA backward raises under use_deterministic_algorithms."""
    kw = {"small_input": True} if name.startswith("resnet") and name in (
        "resnet10", "resnet18", "resnet50") else {}
    for model in (create_backbone(name, in_channels=1, **kw), create_model(name, 10)):
        assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules()), name


def test_global_avg_pool_equals_adaptive_pool_forward_and_backward():
    x = torch.randn(4, 8, 7, 5, requires_grad=True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        a = x.detach().contiguous(memory_format=fmt).requires_grad_()
        b = x.detach().contiguous(memory_format=fmt).requires_grad_()
        ya, yb = GlobalAvgPool()(a), nn.AdaptiveAvgPool2d(1)(b)
        assert ya.shape == yb.shape == (4, 8, 1, 1)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("name", ["resnet8", "resnet10"])
def test_backbone_features_unchanged_by_the_new_pool(name):
    torch.manual_seed(0)
    net = create_backbone(name, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    new = net(x)
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    torch.testing.assert_close(new, net(x))


# ------------------------------------------------------------------ item 6: float32 under bf16

def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_moco_logits_are_float32_under_bf16_autocast():
    from ltrainer.trainer.methods.moco import info_nce_logits

    torch.manual_seed(0)
    q = F.normalize(torch.randn(6, 16), dim=1)
    k = F.normalize(torch.randn(6, 16), dim=1)
    queue = F.normalize(torch.randn(16, 40), dim=0)
    ref = info_nce_logits(q, k, queue, 0.2)
    with _bf16():
        got = info_nce_logits(q, k, queue, 0.2)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref)


def test_knn_scores_are_float32_under_bf16_autocast():
    from ltrainer.trainer.knn import scores as knn_scores

    torch.manual_seed(0)
    query = F.normalize(torch.randn(5, 16), dim=1)
    bank = F.normalize(torch.randn(50, 16), dim=1)
    labels = torch.randint(0, 4, (50,))
    ref = knn_scores(query, bank, labels, 4, 7, 0.1)
    with _bf16():
        got = knn_scores(query, bank, labels, 4, 7, 0.1)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref)


def test_cosine_head_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = CosineHead(16, 5)
    x = torch.randn(4, 16)
    ref = head(x)
    with _bf16():
        got = head(x)
        got.sum().backward()
    assert got.dtype == torch.float32 and head.weight.grad is not None
    assert torch.equal(got, ref)


# ------------------------------------------------------------------ item 9: pinned batches

@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("cuda", [True, False])
def test_torchvision_loader_pins_memory_when_cuda_is_there(monkeypatch, policy, cuda):
    from ltrainer.data_pipelines import loaders

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    data = [(torch.zeros(1, 4, 4), torch.tensor(0))] * 4
    build = loaders._torchvision_loader
    extra = {"spec": None} if "spec" in inspect.signature(build).parameters else {}
    loader = build({"workers": 0}, data, range(4), batch_size=2, seed=0, policy=policy, **extra)
    dl = loader if policy == "fail" else loader.loader   # built, never iterated: no pinning here
    assert dl.pin_memory is cuda


# ------------------------------------------------------------------ item 12: faiss device

def _fake_faiss(calls):
    class Flat:
        def __init__(self, d):
            self.d, self.ntotal = d, 0

        def add(self, x):
            self.ntotal += len(x)

    class Options:
        useFloat16 = False

    def to_gpu(res, device, index, opts=None):
        calls.append((device, None if opts is None else opts.useFloat16))
        return index

    return types.SimpleNamespace(IndexFlatIP=Flat, IndexFlatL2=Flat, get_num_gpus=lambda: 4,
                                 StandardGpuResources=object, GpuClonerOptions=Options,
                                 index_cpu_to_gpu=to_gpu)


def test_faiss_gpu_index_goes_to_this_process_device(monkeypatch):
    from ltrainer.trainer.banks.search import build_index

    calls = []
    monkeypatch.setitem(sys.modules, "faiss", _fake_faiss(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    ref = np.random.default_rng(0).normal(size=(20, 8))
    assert build_index(ref.astype(np.float32)).gpu
    build_index(ref.astype(np.float16))                 # a float16 bank: float16 storage
    build_index(ref.astype(np.float32), float16=True)   # asked for
    build_index(ref.astype(np.float16), float16=False)
    assert calls == [(3, False), (3, True), (3, True), (3, False)]


# ------------------------------------------------------------------ item 4: srun, one GPU per task

def test_first_host_of_slurm_node_lists():
    from ltrainer.trainer.distributed import first_host

    assert first_host("node[01-04]") == "node01"
    assert first_host("gpu[07-10,12],cpu1") == "gpu07"
    assert first_host("gpu[12,07-10]") == "gpu12"
    assert first_host("rack[1-2]-n[01-04]") == "rack1-n01"
    assert first_host("alpha,beta") == "alpha"
    assert first_host("solo") == "solo"
    with pytest.raises(ValueError, match="without"):
        first_host("node[01-04")


def _slurm_env(monkeypatch, **env):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
              "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_srun_tasks_derive_the_rendezvous(monkeypatch):
    import os

    from ltrainer.trainer import distributed as d

    _slurm_env(monkeypatch, SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="3",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]")
    assert d.env_ranks()[:3] == (3, 8, 3)
    d.slurm_rendezvous()
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(d.slurm_port("4242")) and \
        1024 < d.slurm_port("4242") < 32768
    monkeypatch.setenv("MASTER_ADDR", "given")      # torchrun / submitit / the user win
    d.slurm_rendezvous()
    assert os.environ["MASTER_ADDR"] == "given"


def test_slurm_allocation_without_a_task_runs_alone(monkeypatch):
    """A plain `python` in an salloc shell sees SLURM_NTASKS of the allocation, not a rank."""
    from ltrainer.trainer import distributed as d

    _slurm_env(monkeypatch, SLURM_NTASKS="8", SLURM_JOB_ID="1")
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert d.env_ranks()[:2] == (0, 1)


@pytest.mark.parametrize("local_rank,count,want", [(3, 1, 0), (5, 4, 1), (2, 8, 2)])
def test_device_is_local_rank_modulo_visible_gpus(monkeypatch, local_rank, count, want):
    from ltrainer.trainer import distributed as d

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert d.pick_device("auto", local_rank) == torch.device("cuda", want)
    assert chosen == [want]


def test_two_srun_tasks_form_a_group_from_slurm_variables_only(tmp_path):
    """What `srun -n 2 python launchers/train.py` gives each task: SLURM_* only."""
    import os
    import socket
    import subprocess

    from tests.conftest import ROOT
    from ltrainer.trainer.distributed import slurm_port

    job = 1000
    while True:   # a job id whose derived port is free here
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(str(job))))
                break
            except OSError:
                job += 1
    code = ("import torch, torch.distributed as dist; from ltrainer.trainer import distributed as d; "
            "info = d.setup('cpu'); t = torch.tensor([info.rank + 1.0]); dist.all_reduce(t); "
            "print(info.rank, info.world_size, int(t.item())); d.cleanup()")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_")) and
            k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**base, "PYTHONPATH": ROOT, "SLURM_PROCID": str(r),
                                   "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2",
                                   "SLURM_JOB_ID": str(job), "SLURM_JOB_NODELIST": "localhost",
                                   "OMP_NUM_THREADS": "1"}) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip().splitlines()[-1] for o in outs] == ["0 2 3", "1 2 3"]


def _submit_settings(workers: int, gpus: int, nodes: int = 1):
    import argparse

    from ltrainer.launchers import slurm_cluster as submit
    from ltrainer.trainer.config import load_config

    cfg = load_config(None, [f"data.workers={workers}"])
    plan = [types.SimpleNamespace(cfg=cfg, name="x")]
    args = argparse.Namespace(nodes=nodes, gpus_per_node=gpus, cpus_per_task=None,
                              partition=None, timeout=None, mem=None)
    return submit.slurm_settings(plan, args)


@pytest.mark.parametrize("node_cpus,want", [(64, 8), (128, 9), (32, 4)])
def test_default_cpus_per_task_fits_the_partition_nodes(monkeypatch, node_cpus, want):
    """8 GPUs x (workers 8 + 1) = 72 CPUs would be refused by 64-CPU nodes."""
    from ltrainer.launchers import slurm_cluster as submit   # submit.py's cluster checks

    def scontrol(*args):
        if args[:2] == ("show", "partition"):
            return "PartitionName=gpu Default=YES State=UP TotalNodes=2 Nodes=g[1-2] " \
                   "MaxTime=UNLIMITED\n"
        return "".join(f"NodeName=g{i} CPUTot={node_cpus} Gres=gpu:8\n" for i in (1, 2))

    monkeypatch.setattr(submit, "_scontrol", scontrol)
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/" + name)
    s = _submit_settings(workers=8, gpus=8, nodes=2)
    submit.check_cluster(s)
    assert s["cpus_per_task"] == want


def test_default_cpus_per_task_without_node_info():
    assert _submit_settings(workers=8, gpus=8)["cpus_per_task"] == 8   # DEFAULT_CPUS_PER_GPU
    assert _submit_settings(workers=3, gpus=8)["cpus_per_task"] == 4
    assert _submit_settings(workers=8, gpus=0)["cpus_per_task"] == 1


# ----------------------------------------------------------------- model.sync_bn (issue 18.3)

def test_sync_bn_converts_only_on_cuda_with_several_ranks():
    """At 4 images per GPU per-rank BatchNorm statistics are noise: model.sync_bn makes them
    SyncBatchNorm under NCCL; gloo has none, and one process needs none."""
    from ltrainer.trainer.distributed import DistInfo, sync_batchnorm
    model = create_model("resnet8", num_classes=3)
    params = [id(p) for p in model.parameters()]
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for info, why in [(DistInfo(world_size=4, device=torch.device("cpu")), "gloo"),
                      (DistInfo(world_size=1, device=torch.device("cuda", 0)), "one process")]:
        same, note = sync_batchnorm(model, True, info)
        assert same is model and why in note
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert sync_batchnorm(model, False, DistInfo(world_size=4, device=torch.device("cuda", 0))) \
        == (model, "")
    synced, note = sync_batchnorm(model, True, DistInfo(world_size=4,
                                                        device=torch.device("cuda", 0)))
    assert "4 ranks" in note
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert [id(p) for p in synced.parameters()] == params   # the optimizer's tensors stay


@pytest.mark.parametrize("method,extra,refused", [
    ("supervised", [], False),
    ("moco", ["data.augment=moco", "moco.queue=1024"], True),
    ("crt", ["model.init=/nonexistent.pt"], True),
])
def test_sync_bn_is_refused_where_it_cannot_apply(method, extra, refused):
    from ltrainer.trainer.config import ConfigError, load_config
    over = [f"method.name={method}", "model.sync_bn=true", "data.batch_size=128", *extra]
    if not refused:
        assert load_config(None, over).model.sync_bn is True
        return
    with pytest.raises(ConfigError, match="model.sync_bn does not apply to method"):
        load_config(None, over)


def test_engine_reports_sync_bn_ignored_on_one_cpu_process(tiny):
    from ltrainer.trainer.config import load_config
    from ltrainer.trainer.engine import Trainer
    cfg = load_config(None, tiny + ["model.sync_bn=true", "sched.epochs=1",
                                    "sched.warmup_epochs=0", "sched.milestones=[]"])
    trainer = Trainer(cfg)
    try:
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in trainer.model.modules())
        log = open(f"{trainer.run_dir}/run.log").read()
        assert "model.sync_bn ignored here (one process)" in log
    finally:
        trainer.folder.close()
        trainer.log.close()
