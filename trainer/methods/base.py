"""The contract between the engine and a method.

The engine owns the loop: devices, DDP, mixed precision, the optimizer and lr schedule,
checkpoints, logging, evaluation and the data. A method owns only what differs between methods:
the model it trains, what one step computes, and what it needs at an epoch boundary.

A method is an nn.Module: its key encoder, teacher or queue are submodules and buffers, so the
engine checkpoints them with `state_dict()` (plain values a method keeps, such as a queue
pointer, are named in `state_fields`). It never reaches into the engine: each call gets a
StepContext (step, ranks, a generator seeded by (run seed, step), embed, autocast, log), and
what it needs besides the labeled batches (the unlabeled pool, a frozen-feature cache) it
declares in `needs`, which the engine (trainer/serving.py) serves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

import ltrainer.configspec as spec
from ..step_context import StepContext  # noqa: F401  (the type every hook receives)
from ..transfer import load_pretrained


@dataclass
class SamplerChoice:
    """How to draw training samples this epoch (see data_pipelines.samplers.build_sampler)."""
    kind: str = "uniform"
    class_weights: list[float] | None = None   # for kind 'cb': per-class sample weights
    num_epochs: int | None = None              # for kind 'progressive': the epochs T it spans


@dataclass(frozen=True)
class TaskShape:
    """All a method knows of the data: the task's shapes and this process's shard; nothing
    it could open or swap (the engine serves what `needs` declares)."""
    num_classes: int
    in_channels: int
    class_counts: list
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, data) -> "TaskShape":
        return cls(data.num_classes, data.in_channels, list(data.class_counts),
                   getattr(data, "rank", 0), getattr(data, "world_size", 1))


@dataclass(frozen=True)
class DataNeeds:
    """What a method asks the engine for besides the labeled training batches."""
    pool: bool = False             # the unlabeled pool (semi.* keys), given to the constructor
    unlabeled_batch: int = 0       # pool images per global batch, served in Batch.u_images
    pool_split: str | None = None  # the pool as an evaluation split of this name
    feature_cache: bool = False    # train on the training set embedded once (cache_encoder)


class Batch(NamedTuple):
    """One step's inputs on the device: the labeled batch and, for methods that declare
    unlabeled_batch, this rank's pool images with their labels (pseudo, or -1)."""
    images: torch.Tensor
    labels: torch.Tensor
    u_images: torch.Tensor | None = None
    u_labels: torch.Tensor | None = None


class Method(nn.Module):
    name = "base"
    trains = True                # False: sched.epochs must be 0 (NCM, tau-norm, pseudo-labels)
    reads_pool = False           # reads the unlabeled pool (the semi.* pool keys)
    uses_pseudo_labels = False   # trains on semi.pseudo_labels
    state_fields: tuple[str, ...] = ()   # plain attributes saved with the checkpoint
    # The keys this class reads; a subclass adds its own (merged along the bases).
    config = {"model": {
        "init": spec.F("str", None, nullable=True,
                       help="weights to start from: a run folder, a checkpoint (ours, MoCo's "
                            "'module.encoder_q.' format or a torchvision state dict) or '@stage'"),
        "init_head": spec.F("bool", False, help="also load the classifier (tau-norm, LWS)"),
        "sync_bn": spec.F("bool", False, help="SyncBatchNorm over the ranks (a few images per "
                                              "GPU); CUDA with several processes, else ignored"),
    }}
    no_sync_bn: str | None = None  # why model.sync_bn cannot apply to this method, if so

    @classmethod
    def check_config(cls, cfg, fail) -> None:
        """Cross-key rules of this method (a subclass adds its own, then calls super)."""
        why_not = cls.no_sync_bn or (None if cls.trains else "it does not train")
        if cfg.model.sync_bn and why_not:
            fail("model.sync_bn", f"model.sync_bn does not apply to method "
                                  f"'{cfg.method.name}': {why_not}")
        if not cls.trains and cfg.sched.epochs != 0:
            fail("sched.epochs", f"method '{cfg.method.name}' does not train: set "
                                 f"sched.epochs: 0 (and sched.warmup_epochs: 0)")
        if cfg.semi.pseudo_labels and not cls.uses_pseudo_labels:
            from .registry import METHODS
            readers = [n for n, m in METHODS.items() if m.uses_pseudo_labels]
            fail("semi.pseudo_labels", f"semi.pseudo_labels = {cfg.semi.pseudo_labels!r} is "
                                       f"only read by method "
                                       f"{', '.join(repr(n) for n in readers)} (method.name is "
                                       f"'{cfg.method.name}'); set it in that stage only")

    @classmethod
    def needs(cls, cfg) -> DataNeeds:
        """What the engine must serve this config (trainer/serving.py builds it)."""
        return DataNeeds(pool=cls.reads_pool)

    @classmethod
    def eval_split_keys(cls, cfg) -> tuple[str, ...]:
        """Config keys naming a split this method evaluates on besides eval.split (checked
        to exist by trainer/serving.py)."""
        return ()

    def __init__(self, cfg, data, device: torch.device, pool=None):
        """`data`: a TaskShape (or anything with its fields); `pool`: the unlabeled pool
        when `needs` asks for it."""
        super().__init__()
        self.cfg, self.data, self.device, self.pool = cfg, data, device, pool
        self.read_inputs()
        self.model: nn.Module = self.build_model()
        self.init_message = ""
        if cfg.model.init:
            self.init_message = load_pretrained(self.model, cfg.model.init, cfg.model.init_head)

    def read_inputs(self) -> None:
        """Read what build_model and the loss depend on besides the config (pseudo-labels)."""

    @classmethod
    def needs_every_class(cls, cfg) -> str | None:
        """Why this config cannot train with classes that have no training image (None: it
        can, e.g. self-supervised pre-training or plain CE); see create_method."""
        return None

    @classmethod
    def check_world(cls, cfg, world: int) -> list[str]:
        """Why this config cannot run on `world` processes (empty: it can)."""
        if cfg.data.batch_size % world:
            return [f"data.batch_size = {cfg.data.batch_size} (global) is not divisible by "
                    f"the {world} ranks"]
        return []

    # -- what a method must provide -------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """Return (loss, {name: scalar tensor}) for one batch; `model` may be DDP-wrapped."""
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        """Backbone options from the config, for create_model / create_backbone."""
        extra = {"small_input": True} if self.cfg.model.small_input else {}
        return {"image_size": self.cfg.data.image_size, **extra}

    # -- what a method may override -------------------------------------------------
    def train_module(self) -> nn.Module:
        """The module the engine wraps in DDP and switches to train mode (default: the whole
        model; methods with a frozen backbone return only the part they train)."""
        return self.model

    def prepare_eval(self, ctx: StepContext) -> None:
        """Called before each evaluation (e.g. to build a kNN feature bank with ctx.embed)."""

    def param_groups(self) -> list[dict]:
        """Parameters the optimizer updates (default: every trainable parameter)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def on_epoch_start(self, epoch: int) -> SamplerChoice:
        """Called before each epoch; says how to draw this epoch's samples."""
        return SamplerChoice()

    def on_step_end(self, model: nn.Module, ctx: StepContext) -> None:
        """Called after the optimizer step of ctx.step (e.g. momentum-encoder updates)."""

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation."""
        return model(images)

    def summary(self) -> dict:
        """Extra entries for results.json (e.g. the tau that tau-norm chose)."""
        return {}

    def final_model(self) -> nn.Module:
        """The model saved as model_final.pt (e.g. with a learned scaling folded in)."""
        return self.model

    def unlabeled_rows(self):
        """(pool rows, their labels) the engine serves as unlabeled batches (semi methods)."""
        raise NotImplementedError(f"method '{self.name}' declares no unlabeled batches")

    def cache_encoder(self) -> nn.Module:
        """The module whose outputs the engine caches for training (DataNeeds.feature_cache)."""
        raise NotImplementedError(f"method '{self.name}' declares no feature cache")

    # -- state: submodules and buffers by nn.Module, plain values by state_fields ----
    def get_extra_state(self) -> dict:
        return {k: getattr(self, k) for k in self.state_fields}

    def set_extra_state(self, state: dict) -> None:
        if set(state) != set(self.state_fields):
            raise ValueError(f"method '{self.name}': the checkpoint's plain state has "
                             f"{sorted(state)}, this method keeps {sorted(self.state_fields)}")
        for k, v in state.items():
            setattr(self, k, v)
