"""The evaluation protocol: what may choose a hyper-parameter (tau, the epoch) and what reports.

Choosing tau or the best epoch on the split the results report makes the number an oracle
(the most common reason published long-tail numbers do not reproduce). A selection split must
therefore be held out from the reported one (eval.split). The one exception is a data set
that has no validation split apart from the reported one -- iNaturalist 2018, whose 'val' is
both -- and then every place that reports the choice says so.
"""
from __future__ import annotations

from data_pipelines.build import SOURCES, split_problem


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
