"""Shared part of cRT and its family (Kang et al. 2020): the representation learned in an
earlier stage stays fixed and only the classifier is (re)learned or adjusted.

The backbone is frozen and kept in eval mode (its BatchNorm statistics do not move). With
`classifier.cache_features` and no augmentation, the training set is embedded once and the
classifier trains on the cached features, which makes an epoch nearly free.
"""
from __future__ import annotations

import torch

import configspec as spec

from ..losses import loss_from_config
from ..models import create_model
from .base import DataNeeds, Method, SamplerChoice


class FrozenBackbone(Method):
    no_sync_bn = "its backbone is frozen, in eval mode"
    default_sampler = "class_aware"
    reinit_head = True
    needs_trained_head = False   # adjusts the classifier of stage 1 (LWS, tau-norm)
    config = {"classifier": {
        "sampler": spec.F("str", None, "uniform", "class_aware", "sqrt", nullable=True,
                          help="sampling of frozen-backbone methods; null = the method's own "
                               "(cRT, LWS: class_aware; linear_probe: uniform)"),
        "cache_features": spec.F("bool", False, help="embed the training set once (needs "
                                                     "data.augment: none)"),
        "reinit": spec.F("bool", True, help="re-initialize the classifier (cRT, linear probe)"),
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
                            **self.model_kwargs())

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        for p in self.model.backbone.parameters():
            p.requires_grad_(False)
        self.model.backbone.eval()
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
        return SamplerChoice(self.cfg.classifier.sampler or self.default_sampler)

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
