"""The evaluation protocol: what may choose a hyper-parameter (tau, the epoch) and what reports.

Choosing tau or the best epoch on the split the results report makes the number an oracle
(the most common reason published long-tail numbers do not reproduce). A selection split must
therefore be held out from the reported one (eval.split). The one exception is a data set
that has no validation split apart from the reported one -- iNaturalist 2018, whose 'val' is
both -- and then every place that reports the choice says so.
"""
from __future__ import annotations

from ltrainer.configspec import F, Part
from ltrainer.data_pipelines.build import SOURCES, split_problem

from .results import accuracy_report


def has_separate_val(cfg) -> bool:
    """Whether the task has (or can make, with data.val_per_class) a 'val' split that is not
    the reported one."""
    if cfg.eval.split == "val":
        return False
    if split_problem(cfg, "val") is None:
        return True
    # Fixed-split sources (Fashion-MNIST, CIFAR, SVHN): the long-tailed draw leaves unused
    # training images, so data.val_per_class can always hold a balanced 'val' out of them.
    return not getattr(SOURCES[cfg.data.source], "list_per_split", False)


def selection_problem(cfg, key: str, split: str) -> str | None:
    """Why `key` may not select on `split` (None: it may)."""
    problem = split_problem(cfg, split)
    if problem:
        return f"{key} = {split!r}: {problem}"
    if split in ("test", cfg.eval.split) and split != "train" and has_separate_val(cfg):
        how = ("set data.val_per_class (images per class held out of the unused training "
               "images)" if split_problem(cfg, "val") else "")
        return (f"{key} = {split!r} selects on the split the results report (eval.split = "
                f"{cfg.eval.split!r}), which makes them an oracle; select on 'val' instead"
                + (f": {how}" if how else ""))
    return None


def selection_note(cfg, split: str) -> str | None:
    """The line results.json and the log carry when selection and reporting share a split."""
    if split != cfg.eval.split:
        return None
    return (f"selected on '{split}', the split the results report: this data set has no "
            f"validation split apart from it (e.g. iNaturalist 2018), so the reported number "
            f"includes the choice")


def check_selection(cfg, fail, key: str, split: str) -> None:
    """A method's check_config calls this for each key that selects a hyper-parameter."""
    problem = selection_problem(cfg, key, split)
    if problem:
        fail(key, problem)


# The epoch: results.json reports the reported split (eval.split) at the last epoch and at
# the epoch whose validation accuracy was best, each labelled; the run keeps the last weights.
CONFIG = Part({"eval": {"best_on": F(
    "str", "val", "val", "none",
    help="split whose balanced accuracy picks the epoch reported beside the last one, "
         "evaluated at every evaluation ('none': the last epoch only; never test)")}},
    owner=__name__)


def best_epoch_split(cfg) -> tuple[str | None, str | None]:
    """(the split that picks the best epoch or None, why none / a note on sharing a split)."""
    if cfg.eval.best_on == "none":
        return None, "eval.best_on = 'none'"
    if split_problem(cfg, "val"):
        return None, (f"no validation split ({split_problem(cfg, 'val')}); the last epoch is "
                      f"the only one reported")
    return "val", selection_note(cfg, "val")


class EpochSelection:
    """What results.json says about epochs: the reported split at the last evaluation and at
    the one with the best validation balanced accuracy (the earliest of equals). Its state
    goes into the checkpoint, so a resumed run picks what an uninterrupted one would."""

    def __init__(self, cfg, class_counts):
        self.cfg, self.class_counts = cfg, list(class_counts)
        self.split, self.note = best_epoch_split(cfg)
        self.best: dict | None = None

    def report(self, m: dict) -> dict:
        return accuracy_report(m, self.class_counts, self.cfg.eval.many, self.cfg.eval.few)

    def record(self, epoch: int, reported: dict, val: dict | None) -> None:
        """After an evaluation at `epoch`: `reported` on eval.split, `val` on self.split."""
        if val is None:
            return
        score = float(val["balanced_top1"])
        if self.best is None or score > self.best["val_balanced_top1"]:
            self.best = {"epoch": int(epoch), "val_balanced_top1": score,
                         **self.report(reported)}

    def evaluate(self, epoch: int, evaluate) -> dict:
        """One evaluation round of the engine: evaluate() on eval.split, then (with a
        validation split) evaluate(split, prepare=False) on it -- the method's prepare_eval
        (a kNN bank, a chosen tau) is shared -- and record both. Returns the eval.split one."""
        m = evaluate()
        if self.split is not None:
            val = m if self.split == self.cfg.eval.split else evaluate(self.split, prepare=False)
            self.record(epoch, m, val)
        return m

    def results(self, epoch: int, reported: dict) -> dict:
        """The labelled entries of results.json for the final evaluation `reported`."""
        split = self.cfg.eval.split
        last = {"label": f"{split} at the last epoch ({epoch})", "epoch": int(epoch),
                **self.report(reported)}
        if self.split is None or self.best is None:
            best = {"label": f"{split} at the best-validation epoch: not selected", "why":
                    self.note or "no evaluation on the validation split ran"}
        else:
            best = {"label": f"{split} at the best-validation epoch ({self.best['epoch']}, "
                             f"chosen on '{self.split}' balanced accuracy)", **self.best}
            if self.note:
                best["note"] = self.note
        return {f"{split}_last_epoch": last, f"{split}_best_val_epoch": best}

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")


def describe_selection(cfg, method_cls) -> str:
    """For --dry-run's plan line: what chooses a hyper-parameter or the epoch, and where it
    shares the reported split ('' when nothing is chosen)."""
    splits = [(key, cfg[key.split(".")[0]][key.split(".")[1]])
              for key in method_cls.eval_split_keys(cfg)]
    chosen = [(f"chosen on {split} ({key})", split) for key, split in splits]
    split, _ = best_epoch_split(cfg)
    if split and cfg.sched.epochs:
        chosen.append((f"best epoch on {split} reported beside the last", split))
    parts = [text for text, _ in chosen]
    if any(s == cfg.eval.split for _, s in chosen):
        parts.append(f"NOTE: '{cfg.eval.split}' is also the reported split (no other held-out "
                     f"split in this data set, e.g. iNaturalist 2018)")
    return "; ".join(parts)
