"""Methods by name. Each file registers one method, with the config it reads (its class's
`config`, merged along its bases) and its cross-key rules (`check_config`); the engine looks
them up here."""
from __future__ import annotations

from .base import Method
from .registry import METHODS, register  # noqa: F401  (re-exported)


def method_class(cfg) -> type[Method]:
    if cfg.method.name not in METHODS:
        raise ValueError(f"method.name = {cfg.method.name!r} is unknown; "
                         f"available: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method.name]


def create_method(cfg, data, device, pool=None) -> Method:
    """The configured method; `pool`: the unlabeled pool, for methods whose needs() ask for
    it (trainer/serving.py builds both, with everything else a method declares)."""
    cls = method_class(cfg)
    check_every_class(cfg, data.class_counts)
    return cls(cfg, data, device, **({} if pool is None else {"pool": pool}))


def check_every_class(cfg, class_counts):
    """Classes without a training image stop here, with their ids and data.classes, unless
    the method can do without them (Method.needs_every_class)."""
    empty = [i for i, n in enumerate(class_counts) if n == 0]
    reason = METHODS[cfg.method.name].needs_every_class(cfg) if empty else None
    if not reason:
        return
    from ltrainer.data_pipelines.sources import DataError
    ids = [cfg.data.classes[i] for i in empty] if cfg.data.classes else empty
    shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
    can = sorted(n for n, m in METHODS.items() if n != cfg.method.name
                 and not m.needs_every_class(cfg))
    raise DataError(f"{len(ids):,} of {len(class_counts):,} classes have no training image "
                    f"(class ids {shown}) and {reason}; train on the classes you keep with "
                    f"data.classes (a list of class ids), or use a method that does without "
                    f"them (train_rule.name none with loss ce or focal, or method "
                    f"{', '.join(can)})")


from . import (crt, linear_probe, lws, mean_teacher, moco, ncm,  # noqa: E402,F401
               pseudo_label, rotation, self_training, supervised, tau_norm,
               vat)  # each registers itself
from . import logit_adjust, weight_balancing  # noqa: E402,F401
