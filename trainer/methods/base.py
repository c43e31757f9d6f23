"""The contract between the engine and a method.

The engine owns the loop: devices, DDP, mixed precision, the optimizer and lr schedule,
checkpoints, logging and evaluation. A method owns only what differs between methods: the
model it trains, what one step computes, and what it needs at an epoch boundary. Randomness a
method uses inside a step should come from a generator seeded by (run seed, global step) so
that a resumed run repeats it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import configspec as spec

from ..transfer import load_pretrained


@dataclass
class SamplerChoice:
    """How to draw training samples this epoch (see data_pipelines.samplers.build_sampler)."""
    kind: str = "uniform"
    class_weights: list[float] | None = None   # for kind 'cb': per-class sample weights


class Method:
    name = "base"
    trains = True                # False: sched.epochs must be 0 (NCM, tau-norm, pseudo-labels)
    reads_pool = False           # reads the unlabeled pool (the semi.* pool keys)
    uses_pseudo_labels = False   # trains on semi.pseudo_labels
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

    def __init__(self, cfg, data, device: torch.device):
        self.cfg, self.data, self.device = cfg, data, device
        self.trainer = None        # set by the engine: gives access to embed() and autocast()
        self.global_step = 0       # kept current by the engine before each training_step
        self.model: nn.Module = self.build_model()
        self.init_message = ""
        if cfg.model.init:
            self.init_message = load_pretrained(self.model, cfg.model.init, cfg.model.init_head)

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

    def training_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
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

    def prepare_eval(self, trainer) -> None:
        """Called before each evaluation (e.g. to build a kNN feature bank)."""

    def param_groups(self) -> list[dict]:
        """Parameters the optimizer updates (default: every trainable parameter)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def on_epoch_start(self, epoch: int) -> SamplerChoice:
        """Called before each epoch; says how to draw this epoch's samples."""
        return SamplerChoice()

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        """Called after the optimizer step (e.g. momentum-encoder updates)."""

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

    def state_dict(self) -> dict:
        """Extra state beyond the model's parameters (e.g. a queue)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
