"""What every method that trains a classifier on labels shares: the model, the loss and the
train rule (Table 2). Supervised learning and the semi-supervised methods build on it."""
from __future__ import annotations

from ..losses import class_balanced_weights, loss_from_config
from ..models import create_model
from ..schedules import train_rule
from .base import Method, SamplerChoice


class SupervisedBase(Method):
    def build_model(self):
        return create_model(self.cfg.model.name, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels, head=self.cfg.model.head,
                            **self.model_kwargs())

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        counts = self.loss_counts()
        self.loss = loss_from_config(cfg.loss, counts).to(device)
        self.cb_weights = class_balanced_weights(counts, cfg.train_rule.cb_beta).to(device)

    def loss_counts(self) -> list[int]:
        """Class counts behind LDAM's margins and the CB weights: the training set's."""
        return self.data.class_counts

    def on_epoch_start(self, epoch: int) -> SamplerChoice:
        r = self.cfg.train_rule
        rule = train_rule(r.name, epoch, r.start_epoch, r.sampler)
        self.loss.set_class_weights(self.cb_weights if rule.reweight else None)
        return SamplerChoice(rule.sampler, self.cb_weights.tolist())
