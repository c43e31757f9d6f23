"""Learning-rate schedules and re-balancing train rules, both pure functions of the epoch.

Being stateless is what makes resume exact: after a restart the engine recomputes the learning
rate and the rule for the current (epoch, step) instead of restoring scheduler objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def lr_factor(sched, base_lr: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr for `step` (0-based) of `epoch`.

    Linear warm-up over `warmup_epochs` (per step, reaching 1 at the end of warm-up), then:
      step     -> gamma ** (milestones passed)   (CIFAR recipe: x0.01 at 160, x1e-4 at 180)
      cosine   -> half cosine from 1 down to min_lr / base_lr at the last step
      constant -> 1
    """
    t = epoch + step / steps_per_epoch            # progress at the start of this step
    warm = sched.warmup_epochs
    if warm > 0 and t < warm:
        return (t + 1 / steps_per_epoch) / warm
    if sched.name == "step":
        return sched.gamma ** sum(1 for m in sched.milestones if t >= m)
    if sched.name == "cosine":
        floor = sched.min_lr / base_lr if base_lr > 0 else 0.0
        progress = min(max((t - warm) / max(sched.epochs - warm, 1e-12), 0.0), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


@dataclass
class EpochRule:
    """What a train rule asks for in one epoch."""
    sampler: str              # uniform | cb | class_aware | sqrt
    reweight: bool            # use class-balanced loss weights


def train_rule(name: str, epoch: int, start_epoch: int, sampler: str = "cb") -> EpochRule:
    """Table 2 of the paper: None, Reweight, Resample, DRW and DRS.

    DRW / DRS train plainly until `start_epoch`, then re-weight / re-sample. Re-sampling
    draws with the class-balanced (effective-number) weights by default (`sampler` 'cb', as in
    the LDAM-DRW reference) or with 'class_aware' / 'sqrt' sampling.
    """
    late = epoch >= start_epoch
    if name == "none":
        return EpochRule("uniform", False)
    if name == "reweight":
        return EpochRule("uniform", True)
    if name == "resample":
        return EpochRule(sampler, False)
    if name == "drw":
        return EpochRule("uniform", late)
    if name == "drs":
        return EpochRule(sampler if late else "uniform", False)
    raise ValueError(f"train_rule.name = {name!r} is not one of none, reweight, resample, drw, drs")
