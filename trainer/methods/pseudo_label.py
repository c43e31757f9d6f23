"""The pseudo-labelling stage of self-training: the classifier of an earlier stage
(`model.init: "@stage"`, with its head) labels the unlabeled pool, and the stage writes
RUN/pseudo_labels.npz, which a later `self_training` stage reads through
`semi.pseudo_labels: "@this_stage"`. It trains nothing (sched.epochs: 0); the engine's
evaluation of the initial model on the test split comes for free, and results.json gets the
pseudo-labels' accuracy against the pool's hidden labels.
"""
from __future__ import annotations

import os

import torch

import configspec as spec
from data_pipelines.unlabeled_pool import build_pool, check_pool

from .. import distributed as dist_utils
from .. import pseudo_labels
from . import register
from .supervised_base import SupervisedBase

POOL_SPLIT = "unlabeled_pool"


@register
class PseudoLabel(SupervisedBase):
    name = "pseudo_label"
    trains = False
    reads_pool = True
    config = {"semi": {
        "threshold": spec.F("float", 0.0, ge=0, lt=1,
                            help="keep labels of at least this confidence (0 = all, as the "
                                 "reference)"),
        "top_k": spec.F("int", 0, ge=0, help="keep the k most confident per class; 0 = all"),
        "save_probs": spec.F("bool", False, help="also store the probability vectors"),
    }}

    @classmethod
    def check_config(cls, cfg, fail):
        if not cfg.model.init or not cfg.model.init_head:
            fail("method.name", "method 'pseudo_label' labels the pool with a trained "
                                "classifier: set model.init (a run folder, a checkpoint or "
                                "'@stage') and model.init_head: true")
        check_pool(cfg, fail)
        super().check_config(cfg, fail)

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        self.pool = build_pool(cfg.data, cfg.semi)
        data.evals[POOL_SPLIT] = data.make_dataset(self.pool.source, False)
        self.report = None

    def training_step(self, model, batch):
        raise RuntimeError("method 'pseudo_label' does not train: set sched.epochs: 0")

    def prepare_eval(self, trainer) -> None:
        if self.report is not None:
            return
        probs, _ = trainer.embed(POOL_SPLIT, lambda x: torch.softmax(self.model(x).float(), 1))
        s = self.cfg.semi
        pl = pseudo_labels.from_probs(probs.cpu().numpy(), self.pool.hidden, s.threshold,
                                      s.top_k, s.save_probs, pool_fingerprint=self.pool.fingerprint,
                                      checkpoint=self.cfg.model.init, pool=self.pool.summary())
        if trainer.info.is_main:
            pseudo_labels.save(os.path.join(trainer.run_dir, pseudo_labels.FILE), pl)
        dist_utils.barrier()
        self.report = pseudo_labels.accuracy_report(pl)
        trainer.log.info(pseudo_labels.format_report(self.report))

    def summary(self) -> dict:
        return {"pseudo_labels": self.report, "pool": self.pool.summary()}
