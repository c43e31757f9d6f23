"""tau-normalization: divide each class's classifier weights by their norm to the power tau
(tau = 0: unchanged, 1: all classes equal norm). No training; tau is chosen on a held-out split
(balanced accuracy), as in Kang et al. 2020. classifier-balancing's tau_norm.py drops the
classifier bias and tries tau = 0, 0.1, ..., 2 (tau_norm.bias: false; the default grid)."""
from __future__ import annotations

import copy

import torch

import ltrainer.configspec as spec
from ..extraction import HitCounts
from ..metrics import balanced_accuracy
from ..models import LinearHead
from .registry import register
from .classifier_base import FrozenBackbone


TAU_GRID = [round(0.1 * i, 1) for i in range(21)]   # np.linspace(0, 2, 21), the reference's


def tau_normalized(weight: torch.Tensor, tau: float) -> torch.Tensor:
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12) ** tau


def tau_logits(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               tau: float) -> torch.Tensor:
    """feats @ tau_normalized(W).T (+ b unless bias is None), in float32."""
    out = feats.float() @ tau_normalized(weight.float(), tau).T
    return out if bias is None else out + bias.float()


@register
class TauNorm(FrozenBackbone):
    name = "tau_norm"
    reinit_head = False
    needs_trained_head = True
    trains = False
    state_fields = ("tau",)
    config = {"tau_norm": {
        "tau": spec.F("float", None, nullable=True, ge=0,
                      help="null = choose on tau_norm.split"),
        "grid": spec.F("list", TAU_GRID, item="float", ge=0,
                       help="taus tried (default 0, 0.1, ..., 2 as classifier-balancing)"),
        "bias": spec.F("bool", True, help="keep the classifier's bias (false: drop it, as "
                                          "classifier-balancing's tau_norm.py)"),
        "split": spec.F("str", "val", "val", "test", "train",
                        help="split that chooses tau (held out from eval.split)"),
    }}

    @classmethod
    def eval_split_keys(cls, cfg):
        return ("tau_norm.split",) if cfg.tau_norm.tau is None else ()

    def __init__(self, cfg, data, device):
        super().__init__(cfg, data, device)
        if not isinstance(self.model.head, LinearHead):
            raise ValueError("method 'tau_norm' normalizes a linear classifier; set "
                             "model.head: linear")
        self.tau = cfg.tau_norm.tau
        self.search: dict[str, float] = {}

    def logits(self, feats: torch.Tensor, tau: float) -> torch.Tensor:
        fc = self.model.head.fc
        return tau_logits(feats, fc.weight, fc.bias if self.cfg.tau_norm.bias else None, tau)

    def prepare_eval(self, ctx) -> None:
        if self.tau is not None:
            return
        split, grid, c = self.cfg.tau_norm.split, self.cfg.tau_norm.grid, self.data.num_classes
        # Per batch, every tau's prediction (no features kept); per rank, each tau's per-class
        # hits and totals, summed over the ranks (2 x grid x C numbers, whatever the split).
        hits = HitCounts(c, len(grid), ctx.device)     # extraction service sink
        ctx.embed(split, lambda x: torch.stack(
            [self.logits(self.model.backbone(x), tau).argmax(1) for tau in grid], 1),
            gather=False, on_batch=hits)
        counts = hits.total()
        for i, tau in enumerate(grid):
            self.search[f"{tau:g}"] = balanced_accuracy(counts[i], counts[-1])
        best = max(self.search, key=self.search.get)
        self.tau = float(best)
        ctx.log.info(f"tau-norm: tau = {best} chosen on '{split}' (balanced accuracy "
                         f"{self.search[best]:.2f}%; grid {self.search})")

    @torch.no_grad()
    def predict(self, model, images):
        return self.logits(self.model.backbone(images), self.tau)

    def final_model(self):
        model = copy.deepcopy(self.model)
        w = model.head.fc.weight
        w.data.copy_(tau_normalized(w.data, self.tau))
        if not self.cfg.tau_norm.bias:
            model.head.fc.bias.data.zero_()
        return model

    def summary(self) -> dict:
        return {"tau": self.tau, "tau_search": self.search}
