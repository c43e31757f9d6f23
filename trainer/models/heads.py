"""Classifier heads and the `Classifier` wrapper (backbone + head).

Keeping the head separate from the backbone lets two-stage methods (cRT, tau-norm, LWS)
freeze the features and swap or re-initialise only the classifier, and lets LDAM use a cosine
head while every other loss uses a plain linear one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 even inside an autocast region, which would run it in bf16/fp16: for
    similarities that are compared (ranked, or contrasted with float32 ones), not learned."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float()


HEAD_INITS = ("default", "kaiming_normal")


class LinearHead(nn.Module):
    """Ordinary linear classifier (weight and bias), stored as `fc` like torchvision.

    init 'default' is nn.Linear's (uniform, std 1/sqrt(3 in_dim)); 'kaiming_normal' draws the
    weight from N(0, 2/in_dim) and keeps nn.Linear's bias, as the CIFAR ResNets of LDAM-DRW /
    imbalanced-semi-self do (their _weights_init also reaches the classifier).
    """

    def __init__(self, in_dim: int, num_classes: int, init: str = "default"):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"LinearHead: init must be one of {HEAD_INITS}, got {init!r}")
        self.init = init
        self.fc = nn.Linear(in_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.fc.reset_parameters()
        if self.init == "kaiming_normal":
            nn.init.kaiming_normal_(self.fc.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class CosineHead(nn.Module):
    """Cosine-similarity classifier (LDAM's "NormedLinear").

    Logits are cos(feature, class weight), so they lie in [-1, 1]; LDAM scales them by s.
    No bias: a bias would break the bounded, scale-free logits LDAM's margins rely on. The
    weight is stored as (num_classes, in_dim), i.e. in nn.Linear's layout, so it exports
    directly as torchvision's `fc.weight`.
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the reference: uniform(-1, 1), then each class vector rescaled to unit norm.
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float32 under autocast too: LDAM scales these cosines by s = 30, so bf16 rounding
        # (~0.002) would move a logit by ~0.06.
        with torch.autocast(features.device.type, enabled=False):
            return F.linear(F.normalize(features.float(), dim=1),
                            F.normalize(self.weight.float(), dim=1))


class Classifier(nn.Module):
    """A backbone producing pooled features followed by a head producing logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def out_dim(self) -> int:
        """Size of the feature vector the head consumes."""
        return self.backbone.out_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (used by cRT/NCM, feature banks and t-SNE)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def reset_head(self) -> None:
        """Re-initialise the classifier in place, e.g. before cRT re-trains it."""
        self.head.reset_parameters()


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def export_torchvision_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the weights under torchvision's key names, for use outside this trainer.

    Backbone keys lose their "backbone." prefix (conv1.weight, layer1.0.bn1.running_mean,
    ...). A linear head adds `fc.weight` and `fc.bias`, so a torchvision-stem ResNet exports
    into a stock torchvision model with `load_state_dict(..., strict=True)` and the same
    logits (a timm backbone: under timm's classifier name, so it loads into
    timm.create_model(name, num_classes=C) the same way). A cosine head adds only
    `fc.weight` (its un-normalised class vectors): torchvision has no cosine classifier, so
    load such a dict with strict=False and treat it as an initialisation; the logits will
    differ. Tensors share storage with the model (no copy).
    """
    model = _unwrap(model)
    if not isinstance(model, Classifier):
        raise TypeError(f"expected a Classifier, got {type(model).__name__}")
    out = dict(model.backbone.state_dict())
    head = model.head
    fc = getattr(model.backbone, "classifier_name", "fc")   # a timm backbone: timm's name
    if isinstance(head, LinearHead):
        out[f"{fc}.weight"] = head.fc.weight.detach()
        out[f"{fc}.bias"] = head.fc.bias.detach()
    elif isinstance(head, CosineHead):
        out[f"{fc}.weight"] = head.weight.detach()
    elif isinstance(head, ProjectionHead):   # MoCo's MLP, as fc.0 / fc.2 like MoCo's files
        out.update({k: v.detach() for k, v in head.state_dict().items()})
    else:
        raise TypeError(f"cannot export head of type {type(head).__name__}")
    return out


class ProjectionHead(nn.Module):
    """MoCo v2's 2-layer MLP (in -> in -> out_dim with ReLU), named `fc` like MoCo's own
    checkpoints so exported weights read as `fc.0.*` / `fc.2.*`."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                nn.Linear(hidden_dim, out_dim))

    def reset_parameters(self) -> None:
        for m in self.fc:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
