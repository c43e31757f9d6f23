"""Every part of the code that owns config, in the order its sections and checks apply; the
schema (trainer/config.py) is composed from this list. A new loss or method file registers
itself in its registry and needs no line here; a new kind of component adds its registry."""
from __future__ import annotations

from ltrainer.configspec import compose
from ltrainer.data_pipelines import augment, build, loaders, longtail, samplers, sources, unlabeled_pool

from . import accumulate, engine_config, optim, protocol, resume_rules, schedules, serving
from .losses import LOSSES
from .methods import METHODS
from .models import BACKBONES, HEADS

PARTS = [
    engine_config.RUN, resume_rules.CONFIG,
    sources.SOURCES, longtail.CONFIG, samplers.CONFIG, augment.AUGMENTS, build.CONFIG,
    loaders.LOADERS,
    BACKBONES, HEADS,
    LOSSES, schedules.TRAIN_RULES, optim.OPTIMIZERS, accumulate.CONFIG, schedules.SCHEDULES,
    METHODS, serving.CONFIG, unlabeled_pool.CONFIG,
    engine_config.ENGINE, protocol.CONFIG,
]
SCHEMA = compose(PARTS)
