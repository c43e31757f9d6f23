"""Unlabeled pools D_U@Nx with their own imbalance rho_U and relevance (paper, Sections 2-3).

A pool holds `semi.size` x (labeled images) images. Its relevant share (`semi.relevance`) is
spread over the task's classes in proportion to rho_U^(-i/(C-1)), in the labeled set's
head-to-tail order; the rest comes evenly from classes outside the task (of the same source,
e.g. the Fashion-MNIST classes a 5-class task leaves out, or of another data set). The source's
true labels only shape the pool and are kept for analysis: training sees pseudo-labels.

The pool never holds an image that the labeled task trains or evaluates on (its long-tailed
subset, the held-out `data.val_per_class` split, val/test list files), and never comes from
the task's own test split. A request the source cannot fill is refused, class by class.
The same config always gives the same pool; `fingerprint` identifies it by image identity, so
pseudo-labels made for one pool cannot be applied to another by mistake.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ltrainer.configspec import F, Part

from .build import class_order, held_out_val, labeled_split, open_task_split
from .sources import (SOURCES, ConcatSource, DataError, FileSource, SubsetSource, base_indices,
                      open_source, read_index_list, read_list_file)

POOL_FORMAT = "ltt-unlabeled-pool"
POOL_VERSION = 1
POOL_JSON = "pool.json"


def unlabeled_counts(total: int, num_classes: int, rho_u: float) -> list[int]:
    """Pool images per class, head first: proportional to rho_u^(-i/(C-1)), scaled to `total`
    and truncated (the sum may fall a few images short of `total`)."""
    if rho_u < 1:
        raise ValueError(f"semi.rho_u = {rho_u} must be >= 1 (n_max / n_min of the pool)")
    if num_classes == 1:
        return [int(total)]
    w = np.array([rho_u ** (-i / (num_classes - 1.0)) for i in range(num_classes)])
    return [int(v) for v in total * w / w.sum()]


# ------------------------------------------------------------------------------ image identity

def _abspath(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def image_ids(spec: dict, base, indices) -> np.ndarray:
    """A stable identity per image: its file path, or 'kind:split:index' for array data sets."""
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(base, FileSource):
        return np.asarray([_abspath(base.full_path(int(i))) for i in indices], dtype=str)
    return np.char.add(f"{spec['source']}:{spec['split']}:", indices.astype(str))


def _task_spec(d) -> dict:
    lst = d.get("train_list")
    return {"source": d["source"], "root": d["root"], "split": "train",
            "list": _abspath(lst) if lst else None}


def task_image_ids(d, full_train=None, train_src=None) -> np.ndarray:
    """Identities of every image the labeled task trains or evaluates on."""
    if train_src is None:
        full_train, train_src = labeled_split(d)
    spec = _task_spec(d)
    used = [train_src]
    val = held_out_val(d, full_train, train_src)
    if val is not None:
        used.append(val)
    if d["source"] in ("list", "folder"):  # their eval images may come from the same files
        for split, key in (("val", "val_list"), ("test", "test_list")):
            if d["source"] == "list" and not d.get(key):
                continue
            try:
                used.append(open_task_split(d, split))
            except DataError:
                if d["source"] == "list":
                    raise
    return np.concatenate([image_ids(spec, *base_indices(src)) for src in used])


# ------------------------------------------------------------------------------ the pool

@dataclass
class PoolPart:
    """Images `indices` of `base` (opened from `spec`); `hidden` = their task labels, -1 for
    images outside the task."""
    name: str
    spec: dict
    base: object
    indices: np.ndarray
    hidden: np.ndarray

    @property
    def source_labels(self) -> np.ndarray:
        return np.asarray(self.base.labels, dtype=np.int64)[self.indices]

    def ids(self) -> np.ndarray:
        return image_ids(self.spec, self.base, self.indices)


@dataclass
class Pool:
    parts: list
    num_classes: int
    request: dict
    labeled: dict
    _source: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return sum(len(p.indices) for p in self.parts)

    @property
    def hidden(self) -> np.ndarray:
        """True task label of every pool image (-1: outside the task), for analysis only."""
        return np.concatenate([p.hidden for p in self.parts]).astype(np.int64)

    @property
    def source(self):
        """The pool as one source (labels: the hidden ones); one subset of one base when every
        part comes from it, so the accelerated loaders keep their fast paths."""
        if self._source is None:
            bases = {id(p.base) for p in self.parts}
            if len(bases) == 1:
                idx = np.concatenate([p.indices for p in self.parts])
                self._source = SubsetSource(self.parts[0].base, idx, labels=self.hidden,
                                            num_classes=self.num_classes)
            else:
                self._source = ConcatSource([SubsetSource(p.base, p.indices) for p in self.parts],
                                            self.hidden, self.num_classes, name="unlabeled_pool")
        return self._source

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.parts:
            h.update("\n".join(p.ids().tolist()).encode())
            h.update(b"\n--\n")
        return h.hexdigest()

    def summary(self) -> dict:
        hidden = self.hidden
        relevant = hidden[hidden >= 0]
        parts = []
        for p in self.parts:
            labels = p.source_labels
            parts.append({"name": p.name, **p.spec, "count": int(len(p.indices)),
                          "source_class_counts": {str(c): int((labels == c).sum())
                                                  for c in np.unique(labels)}})
        return {"format": POOL_FORMAT, "version": POOL_VERSION, "request": self.request,
                "labeled": self.labeled, "num_classes": self.num_classes, "total": len(self),
                "class_counts": np.bincount(relevant, minlength=self.num_classes).tolist(),
                "irrelevant": int((hidden < 0).sum()), "fingerprint": self.fingerprint,
                "parts": parts}


def _open_base(spec: dict, d=None, full_train=None):
    """The whole source a pool part is drawn from (the task's own, already open, when the
    part comes from the task's train split)."""
    if d is not None and spec["source"] == d["source"] and spec["root"] == d["root"]:
        task = _task_spec(d)
        if (spec["list"] == task["list"] if spec["source"] == "list" else spec["split"] == "train"):
            return base_indices(full_train)[0]
    if spec["source"] == "list":
        return read_list_file(spec["list"], spec["root"])
    return open_source(spec["source"], spec["root"], spec["split"], None)


def _task_map(d, num_source_classes: int, num_classes: int) -> np.ndarray:
    """Source label -> task label (-1 outside the task): data.classes, else the first C ids."""
    classes = d.get("classes") or list(range(num_classes))
    size = max(num_source_classes, max(classes) + 1)
    m = np.full(size, -1, dtype=np.int64)
    m[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes))
    return m


def _part_spec(d, s, prefix: str) -> dict:
    """The source of a pool part from semi.{prefix}source/root/split/list; unset keys of the
    relevant part default to the labeled data set's own train images."""
    kind = s[prefix + "source"]
    if prefix:
        same = False
    else:
        same = kind in (None, d["source"])
        kind = kind or d["source"]
    root = s[prefix + "root"] if s[prefix + "root"] is not None else (d["root"] if same else None)
    lst = s[prefix + "list"] or (d.get("train_list") if same and kind == "list" else None)
    split = s[prefix + "split"]
    if kind == d["source"] and split == "test":
        raise DataError(f"semi.{prefix}split = 'test': the pool may not come from the task's "
                        f"evaluation images; use 'train' (its unused images) or another split")
    if kind == "list" and not lst:
        raise DataError(f"semi.{prefix}source = 'list' needs semi.{prefix}list (a file of "
                        f"'relative/path label' lines)")
    return {"source": kind, "root": root, "split": split if kind != "list" else None,
            "list": _abspath(lst) if lst else None}


def _class_name(c: int, d) -> str:
    classes = d.get("classes")
    return f"class {c} (source class {classes[c]})" if classes else f"class {c}"


def _draw(rng, free: np.ndarray, labels: np.ndarray, want: list, what: str, name) -> np.ndarray:
    """Draw want[k] = (class, n) images of free items; refuse, naming every short class."""
    picked, short = [], []
    for c, n in want:
        cand = np.nonzero(free & (labels == c))[0]
        if len(cand) < n:
            short.append(f"{name(c)} needs {n} but only {len(cand)} are available "
                         f"({n - len(cand)} missing)")
            continue
        picked.append(np.sort(rng.permutation(cand)[:n]))
    if short:
        raise DataError(f"{what} cannot be filled: " + "; ".join(short))
    return np.concatenate(picked) if picked else np.zeros(0, np.int64)


def build_pool(d, s) -> Pool:
    """The unlabeled pool that the `data` (task) and `semi` (pool) config sections describe:
    read from `semi.pool_file` when set, else drawn with `semi.seed`."""
    if s.get("pool_file"):
        return read_pool(s["pool_file"], d)
    full_train, train_src = labeled_split(d)
    num_classes = train_src.num_classes
    n_labeled = len(train_src)
    total = int(round(s["size"] * n_labeled))
    n_rel = int(round(s["relevance"] * total))
    used = task_image_ids(d, full_train, train_src)
    rng = np.random.RandomState(s["seed"])
    request = {"size": s["size"], "rho_u": s["rho_u"], "relevance": s["relevance"],
               "seed": s["seed"], "total": total}
    what = (f"the unlabeled pool D_U@{s['size']:g}x ({total} images: {n_rel} relevant with "
            f"rho_U = {s['rho_u']:g}, {total - n_rel} irrelevant)")

    spec = _part_spec(d, s, "")
    base = _open_base(spec, d, full_train)
    task_map = _task_map(d, base.num_classes, num_classes)
    free = ~np.isin(image_ids(spec, base, np.arange(len(base))), used)
    task = task_map[np.asarray(base.labels, dtype=np.int64)]
    order = class_order(d) or list(range(num_classes))
    want = list(zip(order, unlabeled_counts(n_rel, num_classes, s["rho_u"])))
    where = f"{what} from {spec['source']} {spec['split'] or spec['list']}"
    idx = _draw(rng, free, task, want, where, lambda c: _class_name(c, d))
    parts = [PoolPart("relevant", spec, base, idx, task[idx])] if len(idx) else []

    n_irr = total - n_rel
    if n_irr:
        if s["irrelevant_source"] is None:
            ispec, ibase, ifree, labels = spec, base, free, np.asarray(base.labels, np.int64)
            classes = [int(c) for c in np.unique(labels) if task_map[c] < 0]
            if not classes:
                raise DataError(f"semi.relevance = {s['relevance']:g} < 1 draws images from "
                                f"classes outside the task, but every class of "
                                f"{spec['source']} belongs to it: set data.classes to a subset "
                                f"of its classes, or semi.irrelevant_source")
        else:
            ispec = _part_spec(d, s, "irrelevant_")
            ibase = _open_base(ispec, d, full_train)
            labels = np.asarray(ibase.labels, dtype=np.int64)
            ifree = ~np.isin(image_ids(ispec, ibase, np.arange(len(ibase))), used)
            outside = (_task_map(d, ibase.num_classes, num_classes)[labels] < 0
                       if ispec["source"] == d["source"] else np.ones(len(labels), bool))
            ifree &= outside
            classes = [int(c) for c in np.unique(labels[outside])]
        per, extra = divmod(n_irr, len(classes))
        iwant = [(c, per + (k < extra)) for k, c in enumerate(classes)]
        iidx = _draw(rng, ifree, labels, iwant, f"{what}, its irrelevant part from "
                     f"{ispec['source']} {ispec['split'] or ispec['list']}",
                     lambda c: f"source class {c}")
        parts.append(PoolPart("irrelevant", ispec, ibase, iidx, np.full(len(iidx), -1)))
    if not parts:
        raise DataError(f"{what}: the request is empty; raise semi.size")
    labeled = {"source": d["source"], "classes": d.get("classes"), "rho": d["rho"],
               "n_max": d["n_max"], "count": n_labeled,
               "class_counts": np.bincount(train_src.labels, minlength=num_classes).tolist()}
    return Pool(parts, num_classes, request, labeled)


# ------------------------------------------------------------------------------ pool files

def part_file_name(part: PoolPart) -> str:
    return f"pool.{part.name}.txt"


def pool_files(pool: Pool) -> dict:
    """{file name: text} of a pool: one 'index label' (array sources) or 'path label' (file
    sources) list per part, with the source's true labels, and pool.json naming them."""
    files, summary = {}, pool.summary()
    for p, entry in zip(pool.parts, summary["parts"]):
        name = part_file_name(p)
        labels = p.source_labels
        if isinstance(p.base, FileSource):
            entry["format"] = "path_label"
            lines = [f"{p.base.paths[int(i)]} {int(y)}" for i, y in zip(p.indices, labels)]
        else:
            entry["format"] = "index_label"
            lines = [f"# index label; {p.spec['source']} {p.spec['split']} ({p.name} part of "
                     f"an unlabeled pool: labels for analysis only)"]
            lines += [f"{int(i)} {int(y)}" for i, y in zip(p.indices, labels)]
        entry["file"] = name
        files[name] = "\n".join(lines) + "\n"
    files[POOL_JSON] = json.dumps(summary, indent=1) + "\n"
    return files


def _read_part_indices(path: str, entry: dict, base) -> np.ndarray:
    if entry.get("format") == "path_label":
        listed = read_list_file(path, base.root)
        where = {p: i for i, p in enumerate(base.paths)}
        missing = [p for p in listed.paths if p not in where]
        if missing:
            raise DataError(f"{path}: {len(missing)} listed image(s) are not in the source "
                            f"{entry['list'] or entry['root']} (first: {missing[0]})")
        idx = np.asarray([where[p] for p in listed.paths], dtype=np.int64)
        if not np.array_equal(np.asarray(base.labels)[idx], listed.labels):
            raise DataError(f"{path}: labels differ from the source's; the pool was made "
                            f"from another version of it")
        return idx
    return base_indices(read_index_list(path, base))[1]


def read_pool(path: str, d) -> Pool:
    """A pool written by tools/make_unlabeled_pool.py, checked against the labeled task: the
    same data.classes, and none of the task's training or evaluation images."""
    if not os.path.isfile(path):
        raise DataError(f"semi.pool_file = {path!r}: file not found (write one with "
                        f"tools/make_unlabeled_pool.py)")
    try:
        with open(path) as f:
            summary = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary, dict) or summary.get("format") != POOL_FORMAT:
        raise DataError(f"{path}: not an unlabeled-pool summary (format != {POOL_FORMAT!r})")
    _check_summary(path, summary)
    if summary["labeled"].get("classes") != d.get("classes"):
        raise DataError(f"{path}: made for data.classes = {summary['labeled'].get('classes')}, "
                        f"but this config has {d.get('classes')}")
    full_train, train_src = labeled_split(d)
    num_classes = train_src.num_classes
    used = task_image_ids(d, full_train, train_src)
    folder, parts, bases = os.path.dirname(os.path.abspath(path)), [], {}
    for entry in summary["parts"]:
        spec = {k: entry[k] for k in ("source", "root", "split", "list")}
        key = json.dumps(spec, sort_keys=True)
        if key not in bases:
            bases[key] = _open_base(spec, d, full_train)
        base = bases[key]
        file = os.path.join(folder, entry["file"])
        idx = _read_part_indices(file, entry, base)
        ids = image_ids(spec, base, idx)
        clash = np.isin(ids, used)
        if clash.any():
            raise DataError(f"{file}: {int(clash.sum())} pool image(s) are training or "
                            f"evaluation images of this task (first: {ids[clash][0]}); make "
                            f"the pool again for this config")
        labels = np.asarray(base.labels, dtype=np.int64)[idx]
        task = _task_map(d, base.num_classes, num_classes)[labels]
        if entry["name"] == "irrelevant" and spec["source"] != d["source"]:
            task = np.full(len(idx), -1)
        parts.append(PoolPart(entry["name"], spec, base, idx, task))
    return Pool(parts, num_classes, {**summary["request"], "pool_file": _abspath(path)},
                summary["labeled"])


def _check_summary(path: str, summary: dict):
    """Every key read_pool reads, with its type, so that a hand-edited or foreign pool.json
    fails in one line naming it rather than as a KeyError."""
    want = [f"'{k}' (an object)" for k in ("labeled", "request")
            if not isinstance(summary.get(k), dict)]
    parts = summary.get("parts")
    if not isinstance(parts, list) or not parts:
        want.append("'parts' (a non-empty list)")
    for i, e in enumerate(parts if isinstance(parts, list) else []):
        if not isinstance(e, dict):
            want.append(f"parts[{i}] (an object)")
            continue
        want += [f"parts[{i}].{k} (a string)" for k in ("name", "file", "source")
                 if not isinstance(e.get(k), str)]
        want += [f"parts[{i}].{k} (a string or null)" for k in ("root", "split", "list")
                 if k not in e or not isinstance(e[k], (str, type(None)))]
        if e.get("format", "index_label") not in ("index_label", "path_label"):
            want.append(f"parts[{i}].format ('index_label' or 'path_label')")
    if want:
        raise DataError(f"{path}: malformed pool summary (write it with "
                        f"tools/make_unlabeled_pool.py); expected {', '.join(want[:4])}"
                        f"{' ...' if len(want) > 4 else ''}")


def check_pool_paths(s) -> list[str]:
    """Cheap existence checks of the files a `semi` section points at (for --dry-run)."""
    problems = []
    for key in ("pool_file", "list", "irrelevant_list"):
        if s.get(key) and not os.path.isfile(s[key]):
            problems.append(f"semi.{key} = {s[key]!r}: file not found")
    for key in ("root", "irrelevant_root"):
        if s.get(key) and not os.path.isdir(s[key]):
            problems.append(f"semi.{key} = {s[key]!r}: folder not found")
    return problems


# ------------------------------------------------------------------------------ config

def check_pool(cfg, fail) -> None:
    """Rules of the pool keys; the methods that read a pool run them (see Method.reads_pool)."""
    s = cfg.semi

    def bad(key, why):
        fail(f"semi.{key}", f"semi.{key} = {s[key]!r} {why}")

    for prefix in ("", "irrelevant_"):
        if s[prefix + "source"] == "list" and not s[prefix + "list"]:
            bad(prefix + "source", f"needs semi.{prefix}list (a file of 'relative/path label' "
                                   f"lines)")
    if s.pool_file is None and s.relevance < 1 and s.irrelevant_source is None \
            and not cfg.data.classes and s.source in (None, cfg.data.source):
        bad("relevance", "draws part of the pool from classes outside the task, but the task "
                         "has every class of its data set: set data.classes to a subset, or "
                         "semi.irrelevant_source to another data set")


# The unlabeled pool D_U (paper, Sections 2-3): what `build_pool` reads. The keys of how
# training mixes it with the labeled set belong to the methods (trainer/methods/semi_base.py).
CONFIG = Part({"semi": {
    "size": F("float", 5.0, gt=0, help="D_U@Nx: the pool holds N x the labeled images"),
    "rho_u": F("float", 1.0, ge=1, help="imbalance of the pool's relevant images, in the "
                                             "labeled set's head-to-tail class order"),
    "relevance": F("float", 1.0, ge=0, le=1,
                        help="share of the pool from the task's classes; the rest comes evenly "
                             "from classes outside the task"),
    "seed": F("int", 0, ge=0, help="which images the pool draws"),
    "source": F("str", None, SOURCES, nullable=True,
                     help="pool images; null = the labeled data set's unused train images"),
    "root": F("str", None, nullable=True, help="null = data.root for the same data set"),
    "split": F("str", "train", help="split of semi.source (e.g. 'extra' for SVHN)"),
    "list": F("str", None, nullable=True, help="'path label' list for semi.source: list "
                                                    "(labels in the task's class ids)"),
    "irrelevant_source": F("str", None, SOURCES, nullable=True,
                                help="another data set for the irrelevant share; null = the "
                                     "pool source's classes outside data.classes"),
    "irrelevant_root": F("str", None, nullable=True),
    "irrelevant_split": F("str", "train"),
    "irrelevant_list": F("str", None, nullable=True),
    "pool_file": F("str", None, nullable=True,
                        help="pool.json of tools/make_unlabeled_pool.py instead of the keys "
                             "above"),
}}, owner=__name__)
