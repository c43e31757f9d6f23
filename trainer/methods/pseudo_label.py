"""The pseudo-labelling stage of self-training: the classifier of an earlier stage
(`model.init: "@stage"`, with its head) labels the unlabeled pool, and the stage writes
RUN/pseudo_labels.npz, which a later `self_training` stage reads through
`semi.pseudo_labels: "@this_stage"`. It trains nothing (sched.epochs: 0); the engine's
evaluation of the initial model on the test split comes for free, and results.json gets the
pseudo-labels' accuracy against the pool's hidden labels.
"""
from __future__ import annotations

import os
import shutil

import ltrainer.configspec as spec
from .. import distributed as dist_utils
from .. import pseudo_labels
from ..extraction import embed_to_files
from .registry import register
from .base import DataNeeds
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
        super().check_config(cfg, fail)

    @classmethod
    def needs(cls, cfg) -> DataNeeds:
        return DataNeeds(pool=True, pool_split=POOL_SPLIT)   # the engine opens the split

    def __init__(self, cfg, data, device, pool=None):
        super().__init__(cfg, data, device, pool)
        if pool is None:
            raise ValueError("method 'pseudo_label' labels the unlabeled pool: build it with "
                             "ltrainer.trainer.serving.build_method, which serves the pool")
        self.report = None

    def training_step(self, model, batch, ctx):
        raise RuntimeError("method 'pseudo_label' does not train: set sched.epochs: 0")

    def prepare_eval(self, ctx) -> None:
        if self.report is not None:
            return
        s, c, n = self.cfg.semi, self.data.num_classes, len(self.pool.hidden)
        # Each rank writes its rows (placed later by dataset index: images the loader skipped
        # have none) to files; rank 0 assembles them chunk by chunk (one path with the tool)
        folder = os.path.join(ctx.run_dir, ".pseudo_label_rows")
        embed_to_files(ctx.embed, POOL_SPLIT,
                       pseudo_labels.predictor(self.model, c, s.save_probs), folder,
                       ctx.info.rank)
        report = None
        if ctx.info.is_main:
            pl = pseudo_labels.from_row_files(
                folder, n, c, self.pool.hidden, s.threshold, s.top_k, s.save_probs,
                pool_fingerprint=self.pool.fingerprint, checkpoint=self.cfg.model.init,
                pool=self.pool.summary())
            pseudo_labels.save(os.path.join(ctx.run_dir, pseudo_labels.FILE), pl)
            report = pseudo_labels.accuracy_report(pl)
            del pl
            shutil.rmtree(folder)
        self.report = dist_utils.broadcast_object(report)
        ctx.log.info(pseudo_labels.format_report(self.report))

    def summary(self) -> dict:
        return {"pseudo_labels": self.report, "pool": self.pool.summary()}
