"""What every method that trains a classifier on labels shares: the model, the loss and the
train rule (Table 2). Supervised learning and the semi-supervised methods build on it."""
from __future__ import annotations

from ..losses import class_balanced_weights, loss_from_config
from ..models import create_model
from ..schedules import train_rule
from .base import Method, SamplerChoice


class SupervisedBase(Method):
    @classmethod
    def needs_every_class(cls, cfg):
        from ..losses import LOSSES
        if cfg.train_rule.name != "none":
            return (f"train_rule.name = '{cfg.train_rule.name}' weighs or draws by the class "
                    f"counts")
        if getattr(LOSSES[cfg.loss.name], "needs_counts", False):
            return f"loss.name = '{cfg.loss.name}' is built from the class counts"
        return super().needs_every_class(cfg)

    def build_model(self):
        return create_model(self.cfg.model.name, num_classes=self.data.num_classes,
                            in_channels=self.data.in_channels, head=self.cfg.model.head,
                            head_init=self.cfg.model.head_init, **self.model_kwargs())

    def __init__(self, cfg, data, device, pool=None):
        super().__init__(cfg, data, device, pool)
        counts = self.loss_counts()
        self.loss = loss_from_config(cfg.loss, counts).to(device)
        # None with an empty class: then only rules that never use them may run
        # (needs_every_class, checked by create_method)
        self.cb_weights = (class_balanced_weights(counts, cfg.train_rule.cb_beta).to(device)
                           if min(counts, default=0) > 0 else None)

    def loss_counts(self) -> list[int]:
        """Class counts behind LDAM's margins and the CB weights: the training set's."""
        return self.data.class_counts

    def on_epoch_start(self, epoch: int) -> SamplerChoice:
        r = self.cfg.train_rule
        rule = train_rule(r.name, epoch, r.start_epoch, r.sampler)
        self.loss.set_class_weights(self.cb_weights if rule.reweight else None)
        return SamplerChoice(rule.sampler, None if self.cb_weights is None
                             else self.cb_weights.tolist(), num_epochs=self.cfg.sched.epochs)
