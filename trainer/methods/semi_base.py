"""Shared part of the semi-supervised methods (self-training, Mean Teacher, VAT): every step
takes the engine's labeled batch and a batch of the unlabeled pool, and the loss is
L(D_L) + omega * L(D_U).

The method declares the pool and the pool images per batch (`needs`) and which pool rows it
trains on, with which labels (`unlabeled_rows`: pseudo-labels, or -1); the engine builds the
pool, walks it with its own sampler and epochs (trainer/serving.py: an epoch of the run is one
pass over the labeled set, while the pool, which may be larger, is walked on across run
epochs), checkpoints its position, and serves each step's pool batch in Batch.u_images. The
pool is always drawn uniformly: its imbalance rho_U is what the experiments vary; the train
rule's re-sampling applies to the labeled set and its re-weighting to both losses.
"""
from __future__ import annotations

import math

import numpy as np
import torch

import ltrainer.configspec as spec
from .. import pseudo_labels
from .base import DataNeeds
from .supervised_base import SupervisedBase


def unlabeled_batch(cfg) -> int:
    """Pool images in each global batch (semi.unlabeled_ratio, or semi.size, x the batch)."""
    ratio = cfg.semi.unlabeled_ratio if cfg.semi.unlabeled_ratio is not None else cfg.semi.size
    return int(round(ratio * cfg.data.batch_size))


class SemiSupervised(SupervisedBase):
    reads_pool = True
    config = {"semi": {
        "omega": spec.F("float", 1.0, ge=0, help="loss = L(D_L) + omega * L(D_U)"),
        "unlabeled_ratio": spec.F("float", None, nullable=True, gt=0,
                                  help="pool images per labeled image in each batch; null = "
                                       "semi.size, so an epoch (one pass over the labeled set) "
                                       "is also one pass over the pool"),
        "rampup_epochs": spec.F("float", 0.0, ge=0,
                                help="omega grows as exp(-5 (1 - t/T)^2) over the first T "
                                     "epochs; 0 = constant"),
        "counts": spec.F("str", "combined", "combined", "labeled",
                         help="class counts behind LDAM margins and CB weights in "
                              "self-training: labeled + pseudo-labeled, or the labeled set "
                              "only"),
    }}

    @classmethod
    def check_config(cls, cfg, fail):
        if unlabeled_batch(cfg) < 1:
            fail("semi.unlabeled_ratio", f"semi.unlabeled_ratio = {cfg.semi.unlabeled_ratio!r} "
                                         f"gives no pool image per batch of data.batch_size = "
                                         f"{cfg.data.batch_size}; raise it")
        super().check_config(cfg, fail)

    @classmethod
    def needs(cls, cfg) -> DataNeeds:
        return DataNeeds(pool=True, unlabeled_batch=unlabeled_batch(cfg))

    @classmethod
    def check_world(cls, cfg, world):
        u = unlabeled_batch(cfg)
        extra = [f"semi.unlabeled_ratio x data.batch_size = {u} pool images per batch is not "
                 f"divisible by the {world} ranks"] if u % world else []
        return super().check_world(cfg, world) + extra

    def read_inputs(self) -> None:
        """The pseudo-labels, before the loss is built: its counts may include them."""
        if self.pool is None:
            raise ValueError(f"method '{self.name}' trains on the unlabeled pool: build it "
                             f"with ltrainer.trainer.serving.build_method, which serves the pool")
        self.pseudo = None
        if self.uses_pseudo_labels:
            path = self.cfg.semi.pseudo_labels
            self.pseudo = pseudo_labels.load(path)
            pseudo_labels.check_pool(self.pseudo, path, self.pool.fingerprint, len(self.pool),
                                     self.pool.num_classes)

    def unlabeled_rows(self):
        """The pool rows the engine serves, with their pseudo-labels; without pseudo-labels
        every row, labeled -1 (fails loudly if anything tried to train on them)."""
        if self.pseudo is not None:
            rows = np.nonzero(self.pseudo.selected)[0]
            return rows, self.pseudo.labels[rows]
        return np.arange(len(self.pool)), np.full(len(self.pool), -1, dtype=np.int64)

    def loss_counts(self) -> list[int]:
        counts = list(self.data.class_counts)
        if self.pseudo is not None and self.cfg.semi.counts == "combined":
            extra = np.bincount(self.pseudo.labels[self.pseudo.selected],
                                minlength=self.pool.num_classes)
            counts = [int(a + b) for a, b in zip(counts, extra)]
        return counts

    def unlabeled_weight(self, epoch: int) -> float:
        """omega, ramped up as exp(-5 (1 - t/T)^2) over the first semi.rampup_epochs epochs."""
        s = self.cfg.semi
        if s.rampup_epochs <= 0 or epoch >= s.rampup_epochs:
            return s.omega
        return s.omega * math.exp(-5.0 * (1.0 - epoch / s.rampup_epochs) ** 2)

    def labeled_logs(self, logits, labels, loss_l, loss_u, loss) -> dict:
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean() * 100
        return {"loss": loss.detach(), "loss_l": loss_l.detach(), "loss_u": loss_u.detach(),
                "acc": acc}

    def summary(self) -> dict:
        s = self.pool.summary()
        out = {"pool": {k: s[k] for k in ("request", "total", "class_counts", "irrelevant",
                                           "fingerprint")},
               "omega": self.cfg.semi.omega,
               "unlabeled_per_batch": unlabeled_batch(self.cfg),
               "unlabeled_used": len(self.unlabeled_rows()[0])}
        if self.pseudo is not None:
            out["pseudo_labels"] = self.cfg.semi.pseudo_labels
            out["loss_counts"] = self.loss_counts()
        return {"semi": out}
