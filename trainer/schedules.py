"""Learning-rate schedules and re-balancing train rules, both pure functions of the epoch.

Being stateless is what makes resume exact: after a restart the engine recomputes the learning
rate and the rule for the current (epoch, step) instead of restoring scheduler objects. Each
schedule and rule registers itself (`sched.name`, `train_rule.name`) with the keys it reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ltrainer.configspec import F, Registry


def lr_factor(sched, base_lr: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr for `step` (0-based) of `epoch`.

    Linear warm-up over `warmup_epochs` (see warmup_factor), then the schedule `sched.name`
    at progress t (in epochs).
    """
    t = epoch + step / steps_per_epoch            # progress at the start of this step
    warm = sched.warmup_epochs
    if warm > 0 and t < warm:
        return warmup_factor(sched.warmup, warm, epoch, step, steps_per_epoch)
    return SCHEDULES[sched.name](sched, base_lr, t)


def warmup_factor(kind: str, warm: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The lr multiplier during warm-up.

    per_step: a ramp over every step, reaching 1 at the end of the warm-up (Goyal et al. 2017).
    per_epoch: constant within an epoch, (epoch + 1) / warm: 0.2, 0.4, ... 1.0 of the base lr
    over 5 epochs, as LDAM-DRW's adjust_learning_rate (which the paper's CIFAR runs used).
    """
    if kind == "per_epoch":
        return min(epoch + 1, warm) / warm
    return (epoch + (step + 1) / steps_per_epoch) / warm


def _check_warmup(cfg, fail):
    s = cfg.sched
    if s.warmup_epochs > s.epochs:
        fail("sched.warmup_epochs", f"sched.warmup_epochs ({s.warmup_epochs}) exceeds "
                                    f"sched.epochs ({s.epochs})")
    if s.warmup == "per_epoch" and s.warmup_epochs != int(s.warmup_epochs):
        fail("sched.warmup", f"sched.warmup: per_epoch steps the lr once per epoch; expected a "
                             f"whole number of sched.warmup_epochs, got {s.warmup_epochs:g}")


SCHEDULES = Registry("sched.name", default="step", help="lr schedule after the warm-up",
                     check=_check_warmup, config={"sched": {
                         "epochs": F("int", 200, ge=0),
                         "warmup_epochs": F("float", 5.0, ge=0),
                         "warmup": F("str", "per_step", "per_step", "per_epoch",
                                     help="linear warm-up per step, or per epoch as LDAM-DRW's "
                                          "code (docs/fidelity.md)"),
                     }})


def _step(sched, base_lr, t):
    """gamma ** (milestones passed)   (CIFAR recipe: x0.01 at 160, x1e-4 at 180)"""
    return sched.gamma ** sum(1 for m in sched.milestones if t >= m)


def _check_milestones(cfg, fail):
    if cfg.sched.milestones != sorted(cfg.sched.milestones):
        fail("sched.milestones", "sched.milestones must be increasing")


def _cosine(sched, base_lr, t):
    """Half cosine from 1 down to min_lr / base_lr at the last step."""
    warm = sched.warmup_epochs
    floor = sched.min_lr / base_lr if base_lr > 0 else 0.0
    progress = min(max((t - warm) / max(sched.epochs - warm, 1e-12), 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES.add("step", _step, check=_check_milestones, config={"sched": {
    "milestones": F("list", [160, 180], item="int", ge=0),
    "gamma": F("float", 0.01, ge=0, help="step: lr x gamma^k after the k-th milestone"),
}})
SCHEDULES.add("cosine", _cosine, config={"sched": {
    "min_lr": F("float", 0.0, ge=0, help="cosine floor")}})
SCHEDULES.add("constant", lambda sched, base_lr, t: 1.0)


@dataclass
class EpochRule:
    """What a train rule asks for in one epoch."""
    sampler: str              # uniform | cb | class_aware | class_aware_cyclic | sqrt
    reweight: bool            # use class-balanced loss weights


def train_rule(name: str, epoch: int, start_epoch: int, sampler: str = "cb") -> EpochRule:
    """Table 2 of the paper: None, Reweight, Resample, DRW and DRS.

    DRW / DRS train plainly until `start_epoch`, then re-weight / re-sample. Re-sampling
    draws with the class-balanced (effective-number) weights by default (`sampler` 'cb', as in
    the LDAM-DRW reference) or with 'class_aware' / 'sqrt' sampling.
    """
    if name not in TRAIN_RULES:
        raise ValueError(f"train_rule.name = {name!r} is not one of {', '.join(TRAIN_RULES)}")
    return TRAIN_RULES[name](epoch >= start_epoch, sampler)


TRAIN_RULES = Registry("train_rule.name", default="none", help="re-balancing rule (Table 2)",
                       config={"train_rule": {
                           "start_epoch": F("int", 160, ge=0,
                                            help="epoch at which DRW / DRS switch on"),
                           "cb_beta": F("float", 0.9999, ge=0, lt=1),
                           "sampler": F("str", "cb", "cb", "class_aware", "class_aware_cyclic",
                                        "sqrt", "progressive",
                                        help="how resample / drs draw: CB weights, class-aware "
                                             "(i.i.d. or cyclic as classifier-balancing), "
                                             "square-root or progressively balanced over "
                                             "sched.epochs (Kang et al. 2020)"),
                       }})
TRAIN_RULES.add("none", lambda late, sampler: EpochRule("uniform", False))
TRAIN_RULES.add("reweight", lambda late, sampler: EpochRule("uniform", True))
TRAIN_RULES.add("resample", lambda late, sampler: EpochRule(sampler, False))
TRAIN_RULES.add("drw", lambda late, sampler: EpochRule("uniform", late))
TRAIN_RULES.add("drs", lambda late, sampler: EpochRule(sampler if late else "uniform", False))
