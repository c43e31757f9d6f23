"""NCM: nearest class mean; no training, no classifier bias toward head classes.

classifier.ncm_metric 'cosine': cosine similarity to the normalised mean of each class's
L2-normalised training features. 'centered_l2': classifier-balancing's KNNClassifier
(feat_type 'cl2n', dist_type 'l2'): subtract the mean training feature, L2-normalise, and take
the negative squared Euclidean distance to each class's mean of those features."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import ltrainer.configspec as spec
from .. import distributed as dist_utils
from ..models import LinearHead
from .registry import register
from .classifier_base import FrozenBackbone


NCM_METRICS = ("cosine", "centered_l2")


def ncm_features(feats: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """float32 features, minus `center` (the mean training feature) when given, L2-normalised."""
    feats = feats.float()
    return F.normalize(feats if center is None else feats - center, dim=1)


def ncm_centroids(sums: torch.Tensor, counts: torch.Tensor, metric: str) -> torch.Tensor:
    """Class centroids from per-class sums and counts of ncm_features: cosine normalises the
    sums (direction of the mean); centered_l2 keeps the means themselves (norm <= 1)."""
    if metric == "cosine":
        return F.normalize(sums, dim=1).float()
    return (sums / counts.clamp_min(1)[:, None]).float()


def ncm_logits(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """cosine: x . c; centered_l2: -|x - c|^2 (x are ncm_features)."""
    if metric == "cosine":
        return x @ centroids.T
    return -(x.pow(2).sum(1, keepdim=True) + centroids.pow(2).sum(1)[None, :]
             - 2 * x @ centroids.T)


@register
class NCM(FrozenBackbone):
    name = "ncm"
    reinit_head = False
    trains = False
    state_fields = ("means", "center")
    config = {"classifier": {"ncm_metric": spec.F(
        "str", "cosine", *NCM_METRICS,
        help="ncm: cosine to normalised class means, or centered_l2 (classifier-balancing's "
             "KNNClassifier: centre on the mean training feature, L2-normalise, Euclidean)")}}

    @classmethod
    def needs_every_class(cls, cfg):
        return "method 'ncm' needs a mean feature of each class's training images"

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        self.metric = cfg.classifier.ncm_metric
        self.means = None
        self.center = None    # the mean training feature (centered_l2)

    def normalized_features(self, images):
        return ncm_features(self.model.backbone(images), self.center)

    def prepare_eval(self, ctx) -> None:
        if self.means is not None:
            return
        # Class sums batch by batch, summed over the ranks: memory is C x D whatever the
        # split's size. float64, so that the sums hardly depend on how the split was cut.
        if self.metric == "centered_l2":   # a first pass for the mean training feature
            sums, counts = self._class_sums(ctx, lambda x: self.model.backbone(x).float())
            self.center = (sums.sum(0) / counts.sum().clamp_min(1)).float()
        self.means = ncm_centroids(*self._class_sums(ctx, self.normalized_features),
                                   self.metric)

    def _class_sums(self, ctx, fn):
        """(per-class sums of fn(images) over the train split, per-class counts), summed over
        the ranks."""
        acc, c = {}, self.data.num_classes

        def add(feats, labels):
            if "sums" not in acc:
                acc["sums"] = feats.new_zeros((c, feats.shape[1]), dtype=torch.float64)
                acc["counts"] = feats.new_zeros(c, dtype=torch.float64)
            acc["sums"].index_add_(0, labels, feats.double())
            acc["counts"].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

        feats, _ = ctx.embed("train", fn, gather=False, on_batch=add)
        sums = acc.get("sums", feats.new_zeros((c, feats.shape[1]), dtype=torch.float64))
        counts = acc.get("counts", feats.new_zeros(c, dtype=torch.float64))
        return dist_utils.all_reduce_sum(sums), dist_utils.all_reduce_sum(counts)

    @torch.no_grad()
    def predict(self, model, images):
        return ncm_logits(self.normalized_features(images), self.means, self.metric)

    def final_model(self):
        """A plain classifier with the class means as weights: same argmax as cosine NCM. For
        centered_l2 the bias is -c . center (logits c . (f - center)): the same argmax only
        where the centroids' norms are equal (|c|^2 / |f - center| is dropped); the
        evaluation itself uses the exact rule."""
        model = copy.deepcopy(self.model)
        bias = (torch.zeros(len(self.means)) if self.center is None
                else -(self.means @ self.center)).to(self.means)
        if isinstance(model.head, LinearHead):
            model.head.fc.weight.data.copy_(self.means)
            model.head.fc.bias.data.copy_(bias)
        else:
            model.head.weight.data.copy_(self.means)
        return model
