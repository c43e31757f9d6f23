"""Optimizers by name (`optim.name`), each with the keys it reads; the engine builds one."""
from __future__ import annotations

import torch

from ltrainer.configspec import F, Registry


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
    "lr": F("float", 0.1, gt=0, help="base lr (per group x its lr_scale), for a global batch "
                                     "of optim.ref_batch when that is set"),
    "ref_batch": F("int", None, nullable=True, ge=1,
                   help="linear scaling rule: optim.lr is for this global batch, the lr used "
                        "is lr x data.batch_size / ref_batch; null = lr as given"),
    "weight_decay": F("float", 2e-4, ge=0),
    "grad_clip": F("float", 0.0, ge=0, help="max global grad norm; 0 = off"),
}})
OPTIMIZERS.add("sgd", _sgd, check=_check_nesterov, config={"optim": {
    "momentum": F("float", 0.9, ge=0, lt=1),
    "nesterov": F("bool", False),
    "fused": F("bool", None, nullable=True, help="fused SGD; null = on GPU only"),
}})


def scaled_lr(cfg_optim, batch_size: int) -> float:
    """The lr a run uses: optim.lr, scaled linearly from optim.ref_batch to the global batch
    (Goyal et al. 2017), so a recipe keeps its meaning when the batch or GPU count changes."""
    ref = cfg_optim.ref_batch
    return cfg_optim.lr if ref is None else cfg_optim.lr * batch_size / ref


def describe_lr(cfg_optim, batch_size: int) -> str:
    """How the lr was obtained, for the --dry-run plan and the run's first log line."""
    used, ref = scaled_lr(cfg_optim, batch_size), cfg_optim.ref_batch
    if ref is None:
        return f"lr {used:g} (optim.lr as given; optim.ref_batch null: not scaled)"
    return (f"lr {used:g} (optim.lr {cfg_optim.lr:g} x batch {batch_size} / optim.ref_batch "
            f"{ref})")


def build_optimizer(cfg_optim, groups: list[dict], device: torch.device,
                    batch_size: int | None = None) -> torch.optim.Optimizer:
    """batch_size: the global batch, for optim.ref_batch's scaling (None: no scaling)."""
    lr = cfg_optim.lr if batch_size is None else scaled_lr(cfg_optim, batch_size)
    for g in groups:
        g.setdefault("base_lr", lr * g.pop("lr_scale", 1.0))
    return OPTIMIZERS[cfg_optim.name](cfg_optim, groups, device)
