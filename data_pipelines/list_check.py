"""Check a data set's split lists before a job spends hours on them.

`check_split_lists` parses every line of every split and returns a `ListReport` with ALL the
problems at once (malformed lines with file:line, labels out of range, classes without
training images, duplicates, images missing from a random sample, a few that do not decode)
and a per-split summary (images, classes, min/median/max per class, many/medium/few). It
recognises the official ImageNet-LT and iNaturalist 2018 lists by their git blob SHA-1, or
says how a list differs from the official one it resembles. Used by tools/check_lists.py.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from .list_format import SHOWN, ParsedList, parse_list

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Official:
    name: str          # e.g. "ImageNet-LT train"
    file: str          # the file name it is distributed under
    lines: int
    classes: int
    per_class: int = 0  # balanced splits: images per class (0: long-tailed)


# git blob SHA-1s from the lists README (`git hash-object FILE`).
OFFICIAL = {
    "a063f095fcd475db4cf8b0658c4b73955535bbf9":
        Official("ImageNet-LT train", "ImageNet_LT_train.txt", 115_846, 1000),
    "3ed3188b2f44829ce2dec1cc27040d8d40984088":
        Official("ImageNet-LT val", "ImageNet_LT_val.txt", 20_000, 1000, 20),
    "76a2fb9749d6cd29e765cc4f8c270f2504131e2f":
        Official("ImageNet-LT test", "ImageNet_LT_test.txt", 50_000, 1000, 50),
    "4accdb7584d2f0a5106c40a33ed6afa392189bcc":
        Official("iNaturalist 2018 train", "iNaturalist18_train.txt", 437_513, 8142),
    "4c23900857fd0f5adcd4cc0dffef345039eeb05f":
        Official("iNaturalist 2018 val", "iNaturalist18_val.txt", 24_426, 8142, 3),
}
# iNaturalist 2018 has no test split: the paper reports its val split.
RESEMBLES = {("imagenet", "train"): "ImageNet-LT train", ("imagenet", "val"): "ImageNet-LT val",
             ("imagenet", "test"): "ImageNet-LT test", ("inat", "train"): "iNaturalist 2018 train",
             ("inat", "val"): "iNaturalist 2018 val", ("inat", "test"): "iNaturalist 2018 val"}


def _family(paths: Sequence[str]) -> Optional[str]:
    """Which benchmark a list's paths look like (from its first line)."""
    first = paths[0] if paths else ""
    if first.startswith("train_val2018/"):
        return "inat"
    if first.startswith(("train/n", "val/n")):
        return "imagenet"
    return None


def _ids(ids, limit: int = 20) -> str:
    ids = [int(i) for i in ids]
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return ", ".join(map(str, ids[:limit])) + more


@dataclass
class SplitSummary:
    split: str
    path: str
    images: int = 0
    counts: Optional[np.ndarray] = None      # per task class
    shots: Optional[dict] = None             # many/medium/few -> (classes, images)
    shots_by: str = ""
    identity: str = ""

    def lines(self) -> list[str]:
        if self.counts is None:
            return [f"{self.split:5s} {self.path}: not read"]
        c = self.counts
        present = int((c > 0).sum())
        text = (f"{self.split:5s} {self.path}: {self.images:,} images, {present:,} of "
                f"{len(c):,} classes, per class min {int(c.min()):,} / median "
                f"{float(np.median(c)):g} / max {int(c.max()):,}")
        out = [text]
        if self.shots:
            parts = "/".join(f"{v[0]:,}" for v in self.shots.values())
            imgs = "/".join(f"{v[1]:,}" for v in self.shots.values())
            out.append(f"      many/medium/few{self.shots_by}: {parts} classes, {imgs} images")
        if self.identity:
            out.append(f"      {self.identity}")
        return out


@dataclass
class ListReport:
    splits: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        out = [line for s in self.splits for line in s.lines()]
        out += [f"note: {n}" for n in self.notes]
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("no problems found")
        return "\n".join(out)


def identify(parsed: ParsedList, split: str, counts: Optional[np.ndarray]) -> str:
    """"this is the official ... list", or how the list differs from the one it resembles."""
    known = OFFICIAL.get(parsed.sha1)
    if known:
        role = known.name.rsplit(" ", 1)[1]
        given = "" if role == split else f" (given as the {split} split)"
        return f"this is the official {known.name} list{given}"
    family = _family(parsed.paths)
    name = RESEMBLES.get((family, split))
    if name is None:
        return "not an official ImageNet-LT / iNaturalist 2018 list"
    ref = next(o for o in OFFICIAL.values() if o.name == name)
    n = len(parsed.paths)
    present = int((counts > 0).sum()) if counts is not None else 0
    text = (f"not the official {ref.name} list ({ref.file}): {n:,} lines (official "
            f"{ref.lines:,}), {present:,} classes with images (official {ref.classes:,})")
    off = int((counts != ref.per_class).sum()) if ref.per_class and counts is not None else 0
    if off:
        text += f", {off:,} classes without exactly {ref.per_class} images"
    elif n == ref.lines and present == ref.classes:
        text += "; the totals match, the bytes differ (order, paths or line endings)"
    return text


def _shots(train_counts: np.ndarray, counts: np.ndarray, many: int, few: int) -> dict:
    groups = {"many": train_counts > many, "medium": (train_counts >= few) & (train_counts <= many),
              "few": train_counts < few}
    return {k: (int(m.sum()), int(counts[m].sum())) for k, m in groups.items()}


def _listed(problems: list, messages: list, summary: str):
    """Add one summary problem naming the first SHOWN examples."""
    if messages:
        shown = "; ".join(messages[:SHOWN])
        more = f"; ... ({len(messages)} in all)" if len(messages) > SHOWN else ""
        problems.append(f"{summary}: {shown}{more}")


def _check_files(report: ListReport, parsed: dict, root: str, sample: int, decode: int,
                 check_all: bool, seed: int):
    """Stat a random sample of the listed images (all with check_all) and decode a few."""
    if not os.path.isdir(root):
        report.problems.append(f"image root {root!r}: folder not found; expected the folder "
                               f"the list paths are relative to (data.root)")
        return
    entries = [(p, i) for p in parsed.values() for i in range(len(p.paths))]
    rng = random.Random(seed)
    picked = entries if check_all or len(entries) <= sample else rng.sample(entries, sample)
    missing = [(p, i) for p, i in picked if not os.path.isfile(os.path.join(root, p.paths[i]))]
    what = "listed images" if len(picked) == len(entries) else "sampled images"
    if missing and len(missing) == len(picked):
        first = missing[0][0].paths[missing[0][1]]
        hint = ""
        top = first.split("/", 1)[0]
        below = [d for d in sorted(os.listdir(root))
                 if os.path.isdir(os.path.join(root, d, top))][:1]
        if below:
            hint = f"; {os.path.join(root, below[0], top)} exists: set data.root to " \
                   f"{os.path.join(root, below[0])}?"
        elif os.path.basename(os.path.normpath(root)) == top:
            hint = f"; the paths start with {top}/ already: set data.root to " \
                   f"{os.path.dirname(os.path.normpath(root))}?"
        report.problems.append(f"image root {root!r} holds none of the {len(picked):,} {what} "
                               f"(e.g. {os.path.join(root, first)}, listed at "
                               f"{missing[0][0].where(missing[0][1])}){hint}")
        return
    _listed(report.problems, [f"{os.path.join(root, p.paths[i])} (listed at {p.where(i)})"
                              for p, i in missing],
            f"image root {root!r}: {len(missing):,} of {len(picked):,} {what} missing")
    gone = {(id(p), i) for p, i in missing}
    present = [(p, i) for p, i in picked if (id(p), i) not in gone]
    from PIL import Image

    bad = []
    for p, i in rng.sample(present, min(decode, len(present))):
        path = os.path.join(root, p.paths[i])
        try:
            with Image.open(path) as img:
                img.convert("RGB").load()
        except Exception as exc:  # PIL raises many types for a corrupt file
            bad.append(f"{path} (listed at {p.where(i)}): {exc}")
    _listed(report.problems, bad, f"{len(bad)} of {min(decode, len(present))} decoded "
                                  f"images unreadable")
    report.notes.append(f"checked {len(picked):,} of {len(entries):,} listed images under "
                        f"{root} ({len(missing):,} missing), decoded "
                        f"{min(decode, len(present))}")


def check_split_lists(lists: Mapping[str, Optional[str]], root: Optional[str] = None,
                      num_classes: Optional[int] = None, classes: Optional[Sequence[int]] = None,
                      many: int = 100, few: int = 20, sample: int = 1000, decode: int = 8,
                      check_all_files: bool = False, seed: int = 0,
                      empty_train_ok: bool = False) -> ListReport:
    """Check the split lists {"train": path, "val": path, "test": path} (None: not used).

    ``num_classes`` is the label range (data.num_classes; None: the largest label + 1);
    ``classes`` restricts the task to those labels as data.classes does; ``root`` is the image
    root (None: the files are not checked). ``empty_train_ok``: classes without a training
    image are a note, not a problem (methods that do without them, e.g. MoCo pre-training).
    Returns every problem found, never raises.
    """
    report = ListReport()
    parsed = {}
    for split, path in lists.items():
        if not path:
            continue
        p = parse_list(path)
        report.problems += [f"{split} list {m}" for m in p.problems]
        if not p.ends_with_newline:
            report.problems.append(f"{split} list {path}: the last line has no newline; the "
                                   f"file may be truncated (the official lists end every line)")
        if p.fatal:
            report.splits.append(SplitSummary(split, path))
            continue
        parsed[split] = p
    if not parsed:
        return report
    top = max(int(p.labels.max()) for p in parsed.values() if p.labels.size) + 1 \
        if any(p.labels.size for p in parsed.values()) else 0
    if num_classes is None:
        num_classes = top
        report.notes.append(f"num_classes not given: taking {top} (the largest label + 1)")
    task = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    mapping = np.full(max(num_classes, top, max(task, default=0) + 1), -1, dtype=np.int64)
    mapping[task] = np.arange(len(task))

    counts = {}
    for split, p in parsed.items():
        out = np.nonzero(p.labels >= num_classes)[0]
        _listed(report.problems, [f"{p.where(i)}: label {int(p.labels[i])}" for i in out],
                f"{split} list {p.path}: {len(out):,} labels out of range (expected 0 <= "
                f"label < num_classes = {num_classes})")
        task_labels = mapping[p.labels]
        task_labels = task_labels[task_labels >= 0]
        counts[split] = np.bincount(task_labels, minlength=len(task))
        _duplicates(report, split, p)
    _overlaps(report, parsed)

    hint = ("(to train on a subset of the classes set data.classes to the ones you keep)"
            if classes is None else "(data.classes lists them)")
    train_counts = counts.get("train")
    for split, p in parsed.items():
        empty = np.nonzero(counts[split] == 0)[0]
        if len(empty):
            ids = [task[i] for i in empty]
            need = ("training needs at least one image per class" if split == "train"
                    else "every class should have evaluation images")
            text = (f"{split} list {p.path}: {len(empty):,} of {len(task):,} classes have no "
                    f"image: {_ids(ids)}")
            if split == "train" and empty_train_ok:
                report.notes.append(f"{text} (the method trains without them)")
            else:
                report.problems.append(f"{text}; {need} {hint}")
        summary = SplitSummary(split, p.path, int(counts[split].sum()), counts[split])
        if train_counts is not None:
            summary.shots = _shots(train_counts, counts[split], many, few)
            summary.shots_by = "" if split == "train" else " (by train counts)"
        summary.identity = identify(p, split, counts[split])
        report.splits.append(summary)
    if root is not None:
        _check_files(report, parsed, root, sample, decode, check_all_files, seed)
    else:
        report.notes.append("no image root given: image files not checked")
    return report


def check_data_section(data: Mapping, many: int = 100, few: int = 20, **options) -> ListReport:
    """`check_split_lists` of a config's `data` section (a mapping: source, root, *_list,
    num_classes, classes, check_files) with eval.many / eval.few; for --dry-run and
    tools/check_lists.py. `data.check_files: true` stats every listed image, not a sample."""
    if data.get("source") != "list":
        return ListReport(notes=[f"data.source = {data.get('source')!r}: no list files to "
                                 f"check"])
    options.setdefault("check_all_files", bool(data.get("check_files")))
    return check_split_lists({s: data.get(f"{s}_list") for s in SPLITS}, data.get("root"),
                             data.get("num_classes"), data.get("classes"), many, few, **options)


def _duplicates(report: ListReport, split: str, p: ParsedList):
    first: dict = {}
    dups = []
    for i, path in enumerate(p.paths):
        j = first.setdefault(path, i)
        if j != i:
            same = "" if p.labels[i] == p.labels[j] else \
                f" with labels {int(p.labels[j])} and {int(p.labels[i])}"
            dups.append(f"{path} at lines {int(p.linenos[j])} and {int(p.linenos[i])}{same}")
    _listed(report.problems, dups, f"{split} list {p.path}: {len(dups):,} duplicate lines")


def _overlaps(report: ListReport, parsed: dict):
    """The same image in two splits: a test image seen in training inflates the results."""
    names = list(parsed)
    sets = {s: set(parsed[s].paths) for s in names}
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            if os.path.abspath(parsed[a].path) == os.path.abspath(parsed[b].path):
                if (a, b) == ("val", "test"):  # iNaturalist: no test split, the paper uses val
                    report.notes.append(f"val and test are the same file {parsed[a].path}")
                else:
                    report.problems.append(f"{a} and {b} splits are the same file "
                                           f"{parsed[a].path}")
                continue
            both = sets[a] & sets[b]
            if both:
                shown = sorted(both)[:SHOWN]
                report.problems.append(
                    f"{a} list {parsed[a].path} and {b} list {parsed[b].path}: {len(both):,} "
                    f"images in both (e.g. {', '.join(shown)}); an image should be in one "
                    f"split only")
