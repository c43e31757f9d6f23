"""Methods by name. Each file registers one method, with the config it reads (its class's
`config`, merged along its bases) and its cross-key rules (`check_config`); the engine looks
them up here."""
from __future__ import annotations

from configspec import Registry

from .base import Method

METHODS = Registry("method.name", default="supervised", help="training method")


def register(cls: type[Method]) -> type[Method]:
    return METHODS.register()(cls)


def create_method(cfg, data, device) -> Method:
    if cfg.method.name not in METHODS:
        raise ValueError(f"method.name = {cfg.method.name!r} is unknown; "
                         f"available: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method.name](cfg, data, device)


from . import (crt, linear_probe, lws, mean_teacher, moco, ncm,  # noqa: E402,F401
               pseudo_label, rotation, self_training, supervised, tau_norm,
               vat)  # each registers itself
