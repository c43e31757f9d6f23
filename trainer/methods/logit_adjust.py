"""Post-hoc logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment",
ICLR, eq. 9): predict argmax_y f_y(x) - tau * log pi_y with a model trained by plain CE, pi the
training prior. No training; tau is chosen on a validation split by balanced accuracy (the
paper tunes it on a holdout; tau = 1 is Bayes-optimal for the balanced error when f is a
calibrated posterior). The adjustment folds into the classifier bias, so model_final.pt is
an ordinary linear classifier.
"""
from __future__ import annotations

import copy

import torch

import ltrainer.configspec as spec
from ..extraction import HitCounts
from ..metrics import balanced_accuracy
from ..protocol import selection_note
from .registry import register
from .classifier_base import FrozenBackbone


def log_prior(class_counts) -> torch.Tensor:
    """log(n_y / n) in float32; every class needs a training image."""
    counts = torch.tensor([float(n) for n in class_counts], dtype=torch.float64)
    return (counts / counts.sum()).log().float()


@register
class LogitAdjust(FrozenBackbone):
    name = "logit_adjust"
    reinit_head = False
    needs_trained_head = True
    trains = False
    state_fields = ("tau",)
    config = {"logit_adjust": {
        "tau": spec.F("float", None, nullable=True, ge=0,
                      help="null = choose on logit_adjust.split"),
        "grid": spec.F("list", [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0],
                       item="float", ge=0),
        "split": spec.F("str", "val", "val", "test", "train",
                        help="split that chooses tau (must be held out from eval.split)"),
    }}

    @classmethod
    def eval_split_keys(cls, cfg):   # checked by serving.py: held out from eval.split
        return ("logit_adjust.split",) if cfg.logit_adjust.tau is None else ()

    @classmethod
    def needs_every_class(cls, cfg):
        return "method 'logit_adjust' subtracts the log of each class's training prior"

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        self.register_buffer("log_prior", log_prior(data.class_counts).to(device),
                             persistent=False)
        self.tau = cfg.logit_adjust.tau
        self.search: dict[str, float] = {}

    def adjusted(self, logits: torch.Tensor, tau: float) -> torch.Tensor:
        return logits.float() - tau * self.log_prior.to(logits.device)

    def prepare_eval(self, ctx) -> None:
        if self.tau is not None:
            return
        split, grid = self.cfg.logit_adjust.split, self.cfg.logit_adjust.grid
        # Each tau's per-class hits and totals, batch by batch, summed over the ranks (the
        # extraction service's sink, as tau-norm): no prediction kept, whatever the split.
        hits = HitCounts(self.data.num_classes, len(grid), ctx.device)
        ctx.embed(split, lambda x: torch.stack(
            [self.adjusted(self.model(x), tau).argmax(1) for tau in grid], 1),
            gather=False, on_batch=hits)
        counts = hits.total()
        accs = [balanced_accuracy(counts[i], counts[-1]) for i in range(len(grid))]
        self.search = {f"{tau:g}": acc for tau, acc in zip(grid, accs)}
        best = max(range(len(grid)), key=lambda i: (accs[i], -abs(grid[i] - 1.0)))
        self.tau = float(grid[best])
        note = selection_note(self.cfg, split)
        ctx.log.info(f"logit adjustment: tau = {self.tau:g} chosen on '{split}' (balanced "
                     f"accuracy {accs[best]:.2f}%; grid {self.search})"
                     + (f"; {note}" if note else ""))

    @torch.no_grad()
    def predict(self, model, images):
        return self.adjusted(self.model(images), self.tau)

    def final_model(self):
        model = copy.deepcopy(self.model)
        model.head.fc.bias.data.sub_(self.tau * self.log_prior.to(model.head.fc.bias.device))
        return model

    def summary(self) -> dict:
        split = self.cfg.logit_adjust.split if self.search else None
        out = {"tau": self.tau, "tau_search": self.search,
               "tau_selected_on": split or "config (logit_adjust.tau)"}
        note = split and selection_note(self.cfg, split)
        return {**out, "tau_note": note} if note else out

