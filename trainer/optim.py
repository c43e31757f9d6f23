"""Optimizers by name (`optim.name`), each with the keys it reads; the engine builds one."""
from __future__ import annotations

import torch

from configspec import F, Registry


def _sgd(cfg_optim, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda" if cfg_optim.fused is None else cfg_optim.fused
    return torch.optim.SGD(groups, lr=cfg_optim.lr, momentum=cfg_optim.momentum,
                           weight_decay=cfg_optim.weight_decay, nesterov=cfg_optim.nesterov,
                           fused=True if fused else None)


def _check_nesterov(cfg, fail):
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        fail("optim.nesterov", "optim.nesterov needs optim.momentum > 0")


# Every optimizer reads the lr, the weight decay and the clipping; SGD adds its own keys.
OPTIMIZERS = Registry("optim.name", default="sgd", help="optimizer", config={"optim": {
    "lr": F("float", 0.1, gt=0, help="base lr (per group x its lr_scale)"),
    "weight_decay": F("float", 2e-4, ge=0),
    "grad_clip": F("float", 0.0, ge=0, help="max global grad norm; 0 = off"),
}})
OPTIMIZERS.add("sgd", _sgd, check=_check_nesterov, config={"optim": {
    "momentum": F("float", 0.9, ge=0, lt=1),
    "nesterov": F("bool", False),
    "fused": F("bool", None, nullable=True, help="fused SGD; null = on GPU only"),
}})


def build_optimizer(cfg_optim, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    for g in groups:
        g.setdefault("base_lr", cfg_optim.lr * g.pop("lr_scale", 1.0))
    return OPTIMIZERS[cfg_optim.name](cfg_optim, groups, device)
