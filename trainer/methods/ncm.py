"""NCM: nearest class mean. Classify by cosine similarity to the mean (L2-normalized) feature of
each class's training images; no training, no classifier bias toward head classes."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import distributed as dist_utils
from ..models import LinearHead
from .registry import register
from .classifier_base import FrozenBackbone


@register
class NCM(FrozenBackbone):
    name = "ncm"
    reinit_head = False
    trains = False
    state_fields = ("means",)

    @classmethod
    def needs_every_class(cls, cfg):
        return "method 'ncm' needs a mean feature of each class's training images"

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        self.means = None

    def normalized_features(self, images):
        return F.normalize(self.model.backbone(images).float(), dim=1)

    def prepare_eval(self, trainer) -> None:
        if self.means is not None:
            return
        # Class sums batch by batch, summed over the ranks: memory is C x D whatever the
        # split's size. float64, so that the sums hardly depend on how the split was cut.
        acc = {}

        def add(feats, labels):
            if "sums" not in acc:
                acc["sums"] = feats.new_zeros((self.data.num_classes, feats.shape[1]),
                                              dtype=torch.float64)
            acc["sums"].index_add_(0, labels, feats.double())

        feats, _ = trainer.embed("train", self.normalized_features, gather=False, on_batch=add)
        sums = acc.get("sums", feats.new_zeros((self.data.num_classes, feats.shape[1]),
                                               dtype=torch.float64))
        self.means = F.normalize(dist_utils.all_reduce_sum(sums), dim=1).float()

    @torch.no_grad()
    def predict(self, model, images):
        return self.normalized_features(images) @ self.means.T

    def final_model(self):
        """A plain classifier with the class means as weights: same argmax as cosine NCM."""
        model = copy.deepcopy(self.model)
        if isinstance(model.head, LinearHead):
            model.head.fc.weight.data.copy_(self.means)
            model.head.fc.bias.data.zero_()
        else:
            model.head.weight.data.copy_(self.means)
        return model
