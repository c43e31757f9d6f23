"""CUDA-path defects of the GPU first-contact issue, checked on CPU: deterministic pooling,
float32 similarities under bf16 autocast, pinned torchvision batches, the faiss GPU device,
Slurm rendezvous and device binding. What only a GPU can show is in tools/gpu_check.py."""
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import BACKBONES, CosineHead, create_backbone, create_model
from trainer.models.pooling import GlobalAvgPool


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
    from trainer.methods.moco import info_nce_logits

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
    from trainer.methods.ssl_base import knn_scores

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
    from data_pipelines import loaders

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    data = [(torch.zeros(1, 4, 4), torch.tensor(0))] * 4
    loader = loaders._torchvision_loader({"workers": 0}, data, range(4), 2, 0, policy)
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
    from trainer.feature_bank import build_index

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
