"""Tests for trainer.models: backbones, heads, factory and torchvision export."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from ltrainer.trainer.models import (
    BACKBONES,
    Classifier,
    CosineHead,
    LinearHead,
    create_backbone,
    create_model,
    export_torchvision_state_dict,
)
from ltrainer.trainer.models.resnet_cifar import ZeroPadShortcut

NUM_CLASSES = 7
SMALL_BACKBONES = [n for n in BACKBONES if n != "resnet50"]  # resnet50 is tested alone (slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", SMALL_BACKBONES)
@pytest.mark.parametrize(
    "channels,size,head", [(1, 28, "linear"), (3, 32, "linear"), (3, 32, "cosine")]
)
def test_output_shapes(name, channels, size, head):
    kw = {"image_size": size} if name == "mlp" else {}
    model = create_model(name, NUM_CLASSES, in_channels=channels, head=head, **kw)
    x = torch.randn(2, channels, size, size)
    logits = model(x)
    feats = model.features(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert feats.shape == (2, model.out_dim)
    expected_dim = {"mlp": 64, "resnet10": 512, "resnet18": 512}.get(name, 64)
    assert model.out_dim == expected_dim


def test_resnet50_shapes_one_image():
    model = create_model("resnet50", NUM_CLASSES).eval()
    assert model.out_dim == 2048
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES)
    gray = create_model("resnet50", NUM_CLASSES, in_channels=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 28, 28)).shape == (1, NUM_CLASSES)


def test_small_input_stem_keeps_resolution():
    net = create_backbone("resnet18", in_channels=1, small_input=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1
    assert isinstance(net.maxpool, nn.Identity)
    # 32 px: the stem keeps 32x32, so layer4 still sees 4x4 (vs 1x1 with the ImageNet stem).
    stem_out = net.maxpool(net.relu(net.bn1(net.conv1(torch.randn(2, 1, 32, 32)))))
    assert stem_out.shape[-2:] == (32, 32)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_cifar_resnet_structure():
    model = create_model("resnet32", 10)
    backbone = model.backbone
    assert [len(getattr(backbone, f"layer{i}")) for i in (1, 2, 3)] == [5, 5, 5]
    names = dict(backbone.named_parameters())
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.4.bn2.bias"):
        assert key in names
    # Option-A shortcuts have no parameters; the classic ResNet-32 has ~0.46M parameters.
    assert not any("shortcut" in k for k in names)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.45e6 < n_params < 0.47e6
    assert [len(create_backbone(f"resnet{d}").layer1) for d in (8, 20, 56)] == [1, 3, 9]


def test_zero_pad_shortcut_subsamples_and_pads():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_odd_spatial_size_shortcut_matches_conv():
    # 28 px halves to 14 then 7; a second stride-2 step on 7 must give 4 on both paths.
    backbone = create_backbone("resnet8", in_channels=1)
    x = torch.randn(2, 32, 7, 7)
    assert backbone.layer3(x).shape == (2, 64, 4, 4)


def test_mlp_has_no_batchnorm_and_uses_image_size():
    model = create_model("mlp", 3, in_channels=1, image_size=5, hidden_dim=8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.backbone.fc1.in_features == 25
    assert model(torch.randn(4, 1, 5, 5)).shape == (4, 3)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="resnet32"):
        create_model("resnet33", 10)
    with pytest.raises(ValueError, match="cosine"):
        create_model("resnet8", 10, head="mlp")
    with pytest.raises(TypeError):
        create_model("resnet8", 10, small_input=True)


def test_cosine_head_is_bounded_and_biasless():
    head = CosineHead(16, 5)
    assert [n for n, _ in head.named_parameters()] == ["weight"]
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(5), atol=1e-5)
    out = head(torch.randn(32, 16) * 100)
    assert out.abs().max() <= 1.0 + 1e-6
    # Scaling features or weights must not change cosine logits.
    f = torch.randn(3, 16)
    assert torch.allclose(head(f), head(f * 7.0), atol=1e-6)


def test_classifier_forward_features_and_reset_head():
    for head in ("linear", "cosine"):
        model = create_model("resnet8", 4, head=head).eval()
        x = torch.randn(3, 3, 32, 32)
        assert torch.allclose(model(x), model.head(model.features(x)))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.reset_head()
        after = model.state_dict()
        for key in before:
            changed = not torch.equal(before[key], after[key])
            assert changed == key.startswith("head."), key


def _randomize_bn_stats(model: nn.Module) -> None:
    """Give BN non-default running stats so the export test also covers buffers."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("resnet10", lambda c: ResNet(BasicBlock, [1, 1, 1, 1], num_classes=c)),
        ("resnet18", lambda c: torchvision.models.resnet18(num_classes=c)),
        ("resnet50", lambda c: torchvision.models.resnet50(num_classes=c)),
    ],
)
def test_export_roundtrip_into_torchvision(name, reference):
    model = create_model(name, NUM_CLASSES)
    _randomize_bn_stats(model)
    model.eval()
    state = export_torchvision_state_dict(model)
    assert not any(k.startswith(("backbone.", "head.")) for k in state)
    tv = reference(NUM_CLASSES)
    tv.load_state_dict(state, strict=True)
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=0, atol=0)


def test_export_cosine_head_gives_fc_weight_only():
    model = create_model("resnet18", NUM_CLASSES, head="cosine")
    state = export_torchvision_state_dict(model)
    assert "fc.weight" in state and "fc.bias" not in state
    assert torch.equal(state["fc.weight"], model.head.weight)
    missing, unexpected = torchvision.models.resnet18(num_classes=NUM_CLASSES).load_state_dict(
        state, strict=False
    )
    assert missing == ["fc.bias"] and unexpected == []


def test_export_cifar_resnet_and_ddp_wrapper(tmp_path):
    import torch.distributed as dist

    model = create_model("resnet8", 3)
    expected = {k.removeprefix("backbone."): v for k, v in model.backbone.state_dict().items()}
    expected["fc.weight"] = model.head.fc.weight
    expected["fc.bias"] = model.head.fc.bias
    state = export_torchvision_state_dict(model)
    assert state.keys() == expected.keys()

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        assert export_torchvision_state_dict(wrapped).keys() == expected.keys()
    finally:
        dist.destroy_process_group()

    with pytest.raises(TypeError):
        export_torchvision_state_dict(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        export_torchvision_state_dict(Classifier(model.backbone, nn.Linear(64, 3)))


def test_linear_head_has_fc_with_bias():
    head = LinearHead(8, 3)
    assert sorted(n for n, _ in head.named_parameters()) == ["fc.bias", "fc.weight"]
