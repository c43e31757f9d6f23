"""Shared part of cRT and its family (Kang et al. 2020): the representation learned in an
earlier stage stays fixed and only the classifier is (re)learned or adjusted.

The backbone is frozen; by default it stays in eval mode (its BatchNorm statistics do not
move). `classifier.backbone_bn: train` keeps it in train mode as classifier-balancing's code
does (run_networks.py puts every network in train mode each epoch), so BatchNorm normalises
with the class-balanced batches' statistics and its running statistics follow them. With
`classifier.cache_features` and no augmentation, the training set is embedded once and the
classifier trains on the cached features, which makes an epoch nearly free.
"""
from __future__ import annotations

import torch

import ltrainer.configspec as spec
from .. import distributed as dist_utils
from ..losses import loss_from_config
from ..models import create_model
from .base import DataNeeds, Method, SamplerChoice


class FrozenBackbone(Method):
    no_sync_bn = "its backbone is frozen, in eval mode"
    default_sampler = "class_aware"
    accumulates = True           # optim.accum_steps (trainer/accumulate.py)
    reinit_head = True
    needs_trained_head = False   # adjusts the classifier of stage 1 (LWS, tau-norm)
    config = {"classifier": {
        "sampler": spec.F("str", None, "uniform", "class_aware", "class_aware_cyclic", "sqrt",
                          nullable=True,
                          help="sampling of frozen-backbone methods; null = the method's own "
                               "(cRT, LWS: class_aware; linear_probe: uniform); "
                               "class_aware_cyclic = classifier-balancing's sampler"),
        "cache_features": spec.F("bool", False, help="embed the training set once (needs "
                                                     "data.augment: none)"),
        "reinit": spec.F("bool", True, help="re-initialize the classifier (cRT, linear probe)"),
        "backbone_bn": spec.F("str", "eval", "eval", "train",
                              help="frozen backbone's BatchNorm while training: eval (fixed "
                                   "statistics) or train (classifier-balancing's code)"),
    }}

    @classmethod
    def check_config(cls, cfg, fail):
        name = cfg.method.name
        if not cfg.model.init:
            fail("method.name", f"method '{name}' trains on a fixed representation: set "
                                f"model.init (a run folder, a checkpoint or '@stage')")
        if cls.needs_trained_head and not cfg.model.init_head:
            fail("method.name", f"method '{name}' adjusts a trained classifier: set "
                                f"model.init_head: true")
        if cls.needs_trained_head and cfg.model.head != "linear":
            fail("model.head", f"method '{name}' adjusts a linear classifier; set "
                               f"model.head: linear")
        if cfg.classifier.cache_features and cfg.data.augment != "none":
            fail("classifier.cache_features", "cached features are only exact without "
                                              "augmentation; set data.augment: none")
        if cfg.classifier.backbone_bn == "train" and not cls.trains:
            fail("classifier.backbone_bn", f"classifier.backbone_bn: train moves BatchNorm "
                                           f"statistics while training; method '{name}' does "
                                           f"not train")
        if cfg.classifier.backbone_bn == "train" and cfg.classifier.cache_features:
            fail("classifier.cache_features", "cached features need fixed BatchNorm "
                                              "statistics; set classifier.backbone_bn: eval")
        super().check_config(cfg, fail)

    @classmethod
    def needs_every_class(cls, cfg):
        sampler = cfg.classifier.sampler or cls.default_sampler
        if sampler != "uniform":
            return f"method '{cfg.method.name}' samples {sampler.replace('_', '-')} by class"
        return super().needs_every_class(cfg)

    def build_model(self):
        return create_model(self.cfg.model.name, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels, head=self.cfg.model.head,
                            head_init=self.cfg.model.head_init, **self.model_kwargs())

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        for p in self.model.backbone.parameters():
            p.requires_grad_(False)
        set_backbone_bn(self.model.backbone, "eval")
        if self.reinit_head and cfg.classifier.reinit:
            self.model.reset_head()
        self.loss = loss_from_config(cfg.loss, data.class_counts).to(device)

    def train_module(self):
        return self.model.head

    @classmethod
    def needs(cls, cfg) -> DataNeeds:
        return DataNeeds(feature_cache=cfg.classifier.cache_features)

    def cache_encoder(self):
        return self.model.backbone

    def on_epoch_start(self, epoch: int) -> SamplerChoice:
        set_backbone_bn(self.model.backbone, self.cfg.classifier.backbone_bn)
        return SamplerChoice(self.cfg.classifier.sampler or self.default_sampler)

    def on_step_end(self, model, ctx) -> None:
        # backbone_bn train: each rank's statistics followed its own batches; averaged after
        # every step, all ranks hold (and checkpoint, and resume) the same ones.
        if self.cfg.classifier.backbone_bn == "train" and ctx.info.world_size > 1:
            average_bn_stats(self.model.backbone)

    @torch.no_grad()
    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Backbone features, or the inputs themselves when they are cached features."""
        return inputs if inputs.dim() == 2 else self.model.backbone(inputs)

    def training_step(self, model, batch, ctx):
        inputs, labels = batch.images, batch.labels
        logits = model(self.features(inputs))
        loss = self.loss(logits, labels)
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean() * 100
        return loss, {"loss": loss.detach(), "acc": acc}


def set_backbone_bn(backbone: torch.nn.Module, mode: str) -> None:
    """'eval': the frozen backbone normalises with its stored statistics; 'train': with each
    batch's, updating the running statistics (parameters stay frozen either way)."""
    backbone.train(mode == "train")


def average_bn_stats(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over the ranks, in one all-reduce."""
    stats = [t for m in module.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
             for t in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = dist_utils.all_reduce_mean(torch.cat([t.flatten() for t in stats]))
    for t, v in zip(stats, flat.split([t.numel() for t in stats])):
        t.copy_(v.view_as(t))
