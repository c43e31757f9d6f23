"""What the engine lends a method at each call, instead of a back-reference to itself.

A StepContext names the step (global step, epoch), the process (info: rank, world size,
device), the run seed, and the engine's services a method may use: `embed` (a function over a
whole split, see Trainer.embed), `autocast`, `log` and the run folder. Randomness inside a step
comes from `generator`, seeded by (run seed, step, salt[, rank]), so that a resumed run draws
exactly what an uninterrupted one did.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ltrainer.data_pipelines.samplers import mix_seeds

from .distributed import DistInfo


def _no_engine(*_args, **_kw):
    raise RuntimeError("this StepContext was made outside the engine: it has no embed()")


@dataclass(frozen=True)
class StepContext:
    step: int = 0                       # the global step being taken (0-based)
    epoch: int = 0
    seed: int = 0                       # run.seed
    info: DistInfo = field(default_factory=DistInfo)  # rank, world_size, is_main, device
    embed: Callable = _no_engine        # embed(split, fn, gather=True, indices=False, on_batch=None)
    autocast: Callable = contextlib.nullcontext
    log: object = None                  # RunLog: .info(message)
    run_dir: str | None = None

    @property
    def device(self) -> torch.device:
        return self.info.device

    def at(self, step: int, epoch: int) -> "StepContext":
        return replace(self, step=step, epoch=epoch)

    def generator(self, salt: int, device: torch.device | str = "cpu",
                  per_rank: bool = False) -> torch.Generator:
        """A generator for one random choice of this step: a pure function of (run seed,
        step, salt), and of the rank with per_rank (noise that differs between ranks); the
        same on every rank otherwise (a permutation all ranks must agree on)."""
        values = (self.seed, self.step, self.info.rank, salt) if per_rank else \
            (self.seed, self.step, salt)
        g = torch.Generator(device=device)
        g.manual_seed(mix_seeds(*values) >> 1)
        return g
