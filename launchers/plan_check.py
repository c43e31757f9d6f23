"""What --dry-run and submit.py check and print beyond the config itself (via train.prepare):
every list file of every distinct data section parsed and checked, all problems at once
(data_pipelines/list_check.py), and per stage the numbers a job is sized by: the global batch,
the lr actually used (optim.ref_batch), steps per epoch, epochs and samples per epoch, from
the list files when the images are not there yet.
"""
from __future__ import annotations

import os

import numpy as np

from ltrainer.data_pipelines.build import check_data_paths, labeled_split
from ltrainer.data_pipelines.list_check import check_data_section
from ltrainer.data_pipelines.loaders import backend_problems
from ltrainer.data_pipelines.samplers import epoch_samples
from ltrainer.data_pipelines.sources import DataError
from ltrainer.trainer.methods import METHODS
from ltrainer.trainer.methods.supervised_base import SupervisedBase
from ltrainer.trainer.optim import describe_lr
from ltrainer.trainer.protocol import describe_selection
from ltrainer.trainer.schedules import train_rule

# The shipped ImageNet-LT and iNaturalist configs find their data under this variable
# (configs/_base_/imagenet_lt_data.yaml, inat2018_data.yaml; README "Your data").
DATA_ENV = "LTRAINER_DATA"
LAYOUT = ("$LTRAINER_DATA/imagenet_lt/images/ (the ILSVRC2012 root) with "
          "$LTRAINER_DATA/imagenet_lt/ImageNet_LT_{train,val,test}.txt, and "
          "$LTRAINER_DATA/inat2018/images/ (holding train_val2018/) with "
          "$LTRAINER_DATA/inat2018/iNaturalist18_{train,val}.txt")
# The data keys that decide what the list check sees (data.batch_size etc. do not).
CHECKED = ("source", "root", "train_list", "val_list", "test_list", "num_classes", "classes",
           "check_files", "loader", "dali_device")


class DataProblems(DataError):
    """Every data problem of a plan; launchers print one line each (report_user_error)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _group(plan) -> list[list]:
    """Stages sharing one data section (as the list check sees it), in plan order."""
    groups: dict = {}
    for stage in plan:
        d, e = stage.cfg.data, stage.cfg.eval
        key = repr([d.get(k) for k in CHECKED] + [e.many, e.few])
        groups.setdefault(key, []).append(stage)
    return list(groups.values())


def check_plan_data(plan) -> tuple[list[str], dict]:
    """(every data problem of every distinct data section, {stage name: its ListReport or
    None}). Lists and root that are missing are reported once, by check_data_paths."""
    problems, reports = [], {}
    for stages in _group(plan):
        cfg = stages[0].cfg
        found = check_data_paths(cfg.data) + backend_problems(cfg.data)
        report = None
        if cfg.data.source == "list":
            data = dict(cfg.data)
            for k in ("train_list", "val_list", "test_list"):
                data[k] = data[k] if data[k] and os.path.isfile(data[k]) else None
            if not (data["root"] and os.path.isdir(data["root"])):
                data["root"] = None
            without = all(METHODS[s.cfg.method.name].needs_every_class(s.cfg) is None
                          for s in stages)
            report = check_data_section(data, cfg.eval.many, cfg.eval.few,
                                        empty_train_ok=without)
            found += report.problems
        names = ", ".join(f"'{s.name}'" for s in stages)
        prefix = f"stage {names}: " if len(stages) == 1 else f"stages {names}: "
        problems += [prefix + p for p in found]
        reports.update({s.name: report for s in stages})
    if problems and os.environ.get(DATA_ENV) and any(
            str(s.cfg.data.get("root") or "").startswith(os.environ[DATA_ENV]) for s in plan):
        problems.append(f"the shipped configs look for the data under ${DATA_ENV} = "
                        f"{os.environ[DATA_ENV]!r}: {LAYOUT} (README 'Your data')")
    return problems, reports


def sampler_kinds(cfg) -> list[tuple[str, int]]:
    """[(sampler kind, first epoch)] of a stage: one entry, or two for DRS-like rules."""
    method = METHODS[cfg.method.name]
    if hasattr(method, "default_sampler"):     # frozen-backbone methods (cRT, LWS, ...)
        return [(cfg.classifier.sampler or method.default_sampler, 0)]
    if issubclass(method, SupervisedBase):
        r = cfg.train_rule
        early = train_rule(r.name, 0, r.start_epoch, r.sampler).sampler
        late = train_rule(r.name, r.start_epoch, r.start_epoch, r.sampler).sampler
        if late != early and r.start_epoch < cfg.sched.epochs:
            return [(early, 0), (late, r.start_epoch)]
        return [(early, 0)]
    return [("uniform", 0)]


def _train_counts(stage, report):
    if report is not None:
        train = next((s for s in report.splits if s.split == "train"), None)
        return None if train is None else train.counts
    try:   # arrays (Fashion-MNIST, CIFAR...): the long-tailed subset, without images
        src = labeled_split(stage.cfg.data)[1]
    except (DataError, OSError, ValueError):
        return None
    return np.bincount(np.asarray(src.labels), minlength=src.num_classes)


def _epoch_text(kind: str, counts, batch: int, class_aware_epoch: str = "max_count") -> str:
    if counts is None:
        return f"steps per epoch unknown: data missing ({kind.replace('_', '-')} sampling)"
    present = int((counts > 0).sum())
    n = epoch_samples(kind, counts, class_aware_epoch)
    if n != int(counts.sum()):
        how = (f"{kind.replace('_', '-')}: {present:,} classes x max {int(counts.max()):,} "
               f"per class")
    else:
        how = f"{kind.replace('_', '-')}: the {n:,} training images"
    return f"{n // batch:,} steps x batch {batch} = {n:,} samples per epoch ({how})"


def describe_stages(plan, reports: dict) -> str:
    """Per stage: batch, lr used and how, epochs, steps and samples per epoch."""
    out = []
    for stage in plan:
        c = stage.cfg
        batch = c.data.batch_size
        counts = _train_counts(stage, reports.get(stage.name))
        epochs = "; ".join((f"from epoch {start}: " if start else "") +
                           _epoch_text(kind, counts, batch, c.data.class_aware_epoch)
                           for kind, start in sampler_kinds(c))
        limit = f", stopping at engine.max_steps {c.engine.max_steps}" if c.engine.max_steps else ""
        chosen = describe_selection(c, METHODS[c.method.name])   # trainer/protocol.py
        out.append(f"{stage.name}: global batch {batch}, {describe_lr(c.optim, batch)}, "
                   f"{c.sched.epochs} epochs{limit}; {epochs}; evaluates on {c.eval.split}"
                   + (f"; {chosen}" if chosen else ""))
    return "\n".join(out)


def data_summary(plan, reports: dict) -> str:
    """The list check's per-split lines of each distinct data section."""
    out, seen = [], set()
    for stage in plan:
        report = reports.get(stage.name)
        if report is not None and id(report) not in seen:
            seen.add(id(report))
            out += [line for s in report.splits for line in s.lines()]
            out += [f"note: {n}" for n in report.notes]
    return "\n".join(out)
