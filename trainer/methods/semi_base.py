"""Shared part of the semi-supervised methods (self-training, Mean Teacher, VAT): every step
takes the engine's labeled batch and a batch of the unlabeled pool, and the loss is
L(D_L) + omega * L(D_U).

The pool has its own sampler and loader, built through the DataBundle like the labeled ones
(same backends, DDP shards, per-sample augmentation seeds), and its own epochs: an epoch of the
run is one pass over the labeled set, while the pool, which may be larger, is walked on across
run epochs. Its position (pool epoch, batch) is method state, so it is saved in every
checkpoint and a killed run resumes on exactly the next pool batch. The pool is always drawn
uniformly: its imbalance rho_U is what the experiments vary; the train rule's re-sampling
applies to the labeled set and its re-weighting to both losses.
"""
from __future__ import annotations

import math

import numpy as np
import torch

import configspec as spec
from data_pipelines.samplers import mix_seeds
from data_pipelines.sources import SubsetSource
from data_pipelines.unlabeled_pool import build_pool, check_pool

from .. import pseudo_labels
from ..distributed import batch_to_device
from .base import SamplerChoice
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
        check_pool(cfg, fail)
        if unlabeled_batch(cfg) < 1:
            fail("semi.unlabeled_ratio", f"semi.unlabeled_ratio = {cfg.semi.unlabeled_ratio!r} "
                                         f"gives no pool image per batch of data.batch_size = "
                                         f"{cfg.data.batch_size}; raise it")
        super().check_config(cfg, fail)

    @classmethod
    def check_world(cls, cfg, world):
        u = unlabeled_batch(cfg)
        extra = [f"semi.unlabeled_ratio x data.batch_size = {u} pool images per batch is not "
                 f"divisible by the {world} ranks"] if u % world else []
        return super().check_world(cfg, world) + extra

    def __init__(self, cfg, data, device):
        self.pool = build_pool(cfg.data, cfg.semi)
        self.pseudo = None
        if self.uses_pseudo_labels:   # before the loss is built: its counts may include them
            path = cfg.semi.pseudo_labels
            self.pseudo = pseudo_labels.load(path)
            pseudo_labels.check_pool(self.pseudo, path, self.pool.fingerprint, len(self.pool),
                                     self.pool.num_classes)
        super().__init__(cfg, data, device)
        if self.pseudo is not None:
            rows = np.nonzero(self.pseudo.selected)[0]
            labels = self.pseudo.labels[rows]
        else:   # no labels at all: -1 fails loudly if anything tried to train on them
            rows = np.arange(len(self.pool))
            labels = np.full(len(rows), -1, dtype=np.int64)
        source = SubsetSource(self.pool.source, rows, labels=labels,
                              num_classes=self.pool.num_classes)
        self.unlabeled = data.make_dataset(source, True)
        world, u_global = data.world_size, unlabeled_batch(cfg)
        if u_global % world:
            raise ValueError(f"semi.unlabeled_ratio x data.batch_size = {u_global} pool images "
                             f"per batch must be divisible by the number of processes ({world})")
        if len(self.unlabeled) < u_global:
            raise ValueError(f"the unlabeled pool keeps {len(self.unlabeled)} images, fewer than "
                             f"one batch of {u_global}: lower semi.unlabeled_ratio or the "
                             f"pseudo-label selection (semi.threshold, semi.top_k)")
        self.u_local = u_global // world
        self.u_seed = mix_seeds(cfg.run.seed, 0x0B1A) >> 1   # its own order, not the labeled one
        self.u_epoch = self.u_batch = 0
        self._u_iter = None
        self.epoch = 0
        self.memory_format = (torch.channels_last if cfg.model.channels_last
                              else torch.contiguous_format)

    def loss_counts(self) -> list[int]:
        counts = list(self.data.class_counts)
        if self.pseudo is not None and self.cfg.semi.counts == "combined":
            extra = np.bincount(self.pseudo.labels[self.pseudo.selected],
                                minlength=self.pool.num_classes)
            counts = [int(a + b) for a, b in zip(counts, extra)]
        return counts

    def on_epoch_start(self, epoch: int) -> SamplerChoice:
        self.epoch = epoch
        return super().on_epoch_start(epoch)

    # -- the pool's iterator ---------------------------------------------------------
    def next_unlabeled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next local batch of the pool (images on the device, labels: pseudo or -1)."""
        while True:
            if self._u_iter is None:
                loader, _ = self.data.sampled_loader(("unlabeled",), self.unlabeled, "uniform",
                                                     self.u_local, self.u_seed, self.u_epoch,
                                                     self.u_batch)
                self._u_iter = iter(loader)
            try:
                images, labels = next(self._u_iter)
                break
            except StopIteration:
                self.u_epoch, self.u_batch, self._u_iter = self.u_epoch + 1, 0, None
        self.u_batch += 1
        return batch_to_device((images, labels), self.device, self.memory_format)

    def unlabeled_weight(self) -> float:
        """omega, ramped up as exp(-5 (1 - t/T)^2) over the first semi.rampup_epochs epochs."""
        s = self.cfg.semi
        if s.rampup_epochs <= 0 or self.epoch >= s.rampup_epochs:
            return s.omega
        return s.omega * math.exp(-5.0 * (1.0 - self.epoch / s.rampup_epochs) ** 2)

    def step_generator(self, device: torch.device, salt: int) -> torch.Generator:
        """Randomness of one step on one rank from (run seed, global step, rank): a resumed
        run draws the same noise."""
        g = torch.Generator(device=device)
        g.manual_seed(mix_seeds(self.cfg.run.seed, self.global_step, self.data.rank, salt) >> 1)
        return g

    def labeled_logs(self, logits, labels, loss_l, loss_u, loss) -> dict:
        with torch.no_grad():
            acc = (logits.argmax(1) == labels).float().mean() * 100
        return {"loss": loss.detach(), "loss_l": loss_l.detach(), "loss_u": loss_u.detach(),
                "acc": acc}

    # -- state and summary -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"unlabeled_epoch": self.u_epoch, "unlabeled_batch": self.u_batch}

    def load_state_dict(self, state: dict) -> None:
        self.u_epoch = int(state["unlabeled_epoch"])
        self.u_batch = int(state["unlabeled_batch"])
        self._u_iter = None

    def summary(self) -> dict:
        s = self.pool.summary()
        out = {"pool": {k: s[k] for k in ("request", "total", "class_counts", "irrelevant",
                                           "fingerprint")},
               "omega": self.cfg.semi.omega,
               "unlabeled_per_batch": self.u_local * self.data.world_size,
               "unlabeled_used": len(self.unlabeled)}
        if self.pseudo is not None:
            out["pseudo_labels"] = self.cfg.semi.pseudo_labels
            out["loss_counts"] = self.loss_counts()
        return {"semi": out}
