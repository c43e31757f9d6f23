"""From the `data` section of a config to datasets and loaders the engine can iterate.

The engine asks for a training loader per epoch by sampler kind (a train rule may switch from
uniform to class-balanced sampling mid-run) and for evaluation loaders by split. Loaders are
built once per kind and re-pointed at each epoch through `sampler.set_epoch`, so worker
processes are not restarted every epoch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ltrainer.configspec import F, Part

from .augment import DEFAULT_STATS, build_transform
from .datasets import AugmentedDataset
from .longtail import class_counts, make_lt_subset, n_max_for
from .samplers import SequentialSampler, build_sampler, sampler_options
from .sources import (FASHION_MNIST_ROOT, SOURCES, DataError, SubsetSource, open_source,
                      select_classes)
from .torchvision_loader import build_torchvision_loader

# SVHN-LT in the reference puts label 0 last in the head-to-tail order.
CLASS_ORDER = {"svhn": [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]}


@dataclass
class DataBundle:
    cfg: dict
    train: AugmentedDataset
    evals: dict
    num_classes: int
    in_channels: int
    class_counts: list
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    open_eval: object = None
    make_dataset: object = None   # (source, train: bool) -> dataset with this config's transform
    _loaders: dict = field(default_factory=dict)

    def eval_dataset(self, split: str) -> AugmentedDataset:
        if split not in self.evals:
            self.evals[split] = self.open_eval(split)
        return self.evals[split]

    def replace_train(self, dataset: AugmentedDataset):
        """Train on another dataset of the same samples (e.g. cached features)."""
        self.train = dataset
        self._loaders = {k: v for k, v in self._loaders.items() if k[0] == "eval"}

    @property
    def local_batch(self) -> int:
        return self.cfg["batch_size"] // self.world_size

    def train_loader(self, kind: str, epoch: int, start_batch: int = 0, class_weights=None,
                     num_epochs=None):
        """(loader, sampler) positioned at `start_batch` of `epoch` (num_epochs: the schedule
        a progressively-balanced sampler moves over)."""
        return self.sampled_loader(("train", kind), self.train, kind, self.local_batch, self.seed,
                                   epoch, start_batch, class_weights, num_epochs)

    def sampled_loader(self, key, dataset, kind: str, local_batch: int, seed: int, epoch: int,
                       start_batch: int = 0, class_weights=None, num_epochs=None):
        """(loader, sampler) over any dataset with our samplers, DDP shards and backend (e.g. an
        unlabeled pool beside the labeled set), built once per key, positioned at
        `start_batch` of `epoch`."""
        if key not in self._loaders:
            sampler = build_sampler(kind, dataset.source.labels, batch_size=local_batch,
                                    world_size=self.world_size, rank=self.rank, seed=seed,
                                    class_weights=class_weights, num_epochs=num_epochs,
                                    **sampler_options(self.cfg))
            from .loaders import make_train_loader  # backend chosen by data.loader

            loader = make_train_loader(self.cfg, dataset, sampler, batch_size=local_batch,
                                       seed=seed + 7919 * self.rank,
                                       in_channels=self.in_channels)
            self._loaders[key] = (loader, sampler)
        loader, sampler = self._loaders[key]
        sampler.set_epoch(epoch, start_batch)
        return loader, sampler

    def eval_loader(self, split: str):
        key = ("eval", split)
        if key not in self._loaders:
            ds = self.eval_dataset(split)
            sampler = SequentialSampler(len(ds), self.world_size, self.rank)
            bs = max(1, self.cfg["eval_batch_size"] // self.world_size)
            from .loaders import make_eval_loader  # backend chosen by data.loader

            self._loaders[key] = make_eval_loader(self.cfg, ds, sampler, batch_size=bs,
                                                  seed=self.seed, in_channels=self.in_channels)
        return self._loaders[key]


def open_task_split(cfg, split: str):
    """One split of the task's data set, restricted to `data.classes` when set."""
    list_key = {"train": "train_list", "val": "val_list", "test": "test_list"}[split]
    src = open_source(cfg["source"], cfg["root"], split, cfg.get(list_key),
                      num_classes=cfg.get("num_classes"))
    return select_classes(src, cfg["classes"]) if cfg.get("classes") else src


def class_order(cfg):
    """Head-to-tail order of the task's labels: data.classes as listed, else the source's."""
    return None if cfg.get("classes") else CLASS_ORDER.get(cfg["source"])


def labeled_split(cfg) -> tuple:
    """(the whole train split of the task, its long-tailed subset that training uses)."""
    full_train = open_task_split(cfg, "train")
    train_src = full_train
    if cfg["imbalance"] != "none":
        train_src = make_lt_subset(full_train, n_max=n_max_for(cfg["source"], cfg["n_max"]),
                                   rho=cfg["rho"],
                                   profile=cfg["imbalance"], seed=cfg["lt_seed"],
                                   class_order=class_order(cfg))
    return full_train, train_src


def held_out_val(cfg, full_train, train_src):
    """The `val_per_class` split of unused train images, or None when it is not configured."""
    if not cfg.get("val_per_class"):
        return None
    used = getattr(train_src, "indices", np.arange(0))
    idx = held_out_per_class(full_train, used, cfg["val_per_class"], cfg["lt_seed"] + 1)
    return SubsetSource(full_train, idx)


def held_out_per_class(full, used, per_class: int, seed: int):
    """Indices of `per_class` images of each class of `full` that are not in `used`
    (a balanced validation split from the train images a long-tailed subset left out)."""
    labels = np.asarray(full.labels)
    free = np.setdiff1d(np.arange(len(labels)), np.asarray(used))
    rng = np.random.RandomState(seed)
    picked = []
    for c in range(full.num_classes):
        pool = free[labels[free] == c]
        if len(pool) < per_class:
            raise DataError(f"data.val_per_class = {per_class}: class {c} has only {len(pool)} "
                            f"train images outside the long-tailed subset")
        picked.append(np.sort(rng.permutation(pool)[:per_class]))
    return np.concatenate(picked)


def build_data(cfg, rank: int = 0, world_size: int = 1, seed: int = 0,
               eval_splits=("test",)) -> DataBundle:
    """Open the train split (made long-tailed as configured) and the evaluation splits.

    Evaluation splits: 'test', 'val' (a list/folder split, or `val_per_class` held-out train
    images), and 'train' (the training images without augmentation, for feature banks)."""
    full_train, train_src = labeled_split(cfg)
    stats_name = cfg["stats"] or cfg["source"]
    if stats_name not in DEFAULT_STATS:
        raise DataError(f"data.stats = {stats_name!r}: no normalization statistics by that name; "
                        f"choose one of {', '.join(DEFAULT_STATS)}")
    mean, std = DEFAULT_STATS[stats_name]
    in_channels = len(mean)

    def dataset(src, train):
        t = build_transform(cfg["augment"], train, cfg["image_size"], mean, std, in_channels)
        return AugmentedDataset(src, t)

    def open_eval(split):
        if split == "train":
            return dataset(train_src, False)
        if split == "val" and cfg.get("val_per_class"):
            return dataset(held_out_val(cfg, full_train, train_src), False)
        try:
            return dataset(open_task_split(cfg, split), False)
        except DataError as e:
            if split != "val":
                raise
            raise DataError(f"{e} (for a validation split of held-out train images set "
                            f"data.val_per_class)") from None

    counts = class_counts(train_src.labels, train_src.num_classes)
    bundle = DataBundle(cfg, dataset(train_src, True), {}, train_src.num_classes, in_channels,
                        counts, rank, world_size, seed, open_eval=open_eval, make_dataset=dataset)
    for split in eval_splits:  # open now, so that a missing split fails before training
        bundle.eval_dataset(split)
    return bundle


def check_data_paths(cfg) -> list[str]:
    """Cheap existence checks of the data a config points at, run before any job starts;
    each problem names the config key and the path it looked at."""
    problems = []
    source, root = cfg["source"], cfg["root"]
    if source == "fashion_mnist" and root is None:
        root = FASHION_MNIST_ROOT
        if not os.path.isdir(root):
            problems.append(f"data.root is unset and the default {root} does not exist "
                            f"(apt-get install dataset-fashion-mnist, or set data.root)")
            return problems
    if root is not None and not os.path.isdir(root):
        hint = (" (Fashion-MNIST: apt-get install dataset-fashion-mnist and leave data.root "
                "unset)" if source == "fashion_mnist" else "")
        problems.append(f"data.root = {root!r}: folder not found{hint}")
    for key in ("train_list", "val_list", "test_list"):
        path = cfg.get(key)
        if path and not os.path.isfile(path):
            problems.append(f"data.{key} = {path!r}: file not found")
    if source == "folder" and root and os.path.isdir(root) \
            and not os.path.isdir(os.path.join(root, "train")):
        problems.append(f"data.root = {root!r}: no train/ sub-folder of class folders")
    return problems


def split_problem(cfg, split: str) -> str | None:
    """Why the task has no `split`, when the config alone can tell (None: it has one, or only
    its files can tell, which check_data_paths does)."""
    d = cfg.data
    if split == "train" or (split == "val" and d.val_per_class):
        return None
    opener = SOURCES[d.source]
    if getattr(opener, "list_per_split", False):
        key = f"{split}_list"
        return None if d[key] else f"data.source = '{d.source}' has no '{split}' split: set data.{key}"
    known = getattr(opener, "splits", None)
    if known is None or split in known:
        return None
    hint = "; set data.val_per_class for a held-out one" if split == "val" else ""
    return f"data.source = '{d.source}' has no '{split}' split (only {', '.join(known)}){hint}"


def _check_classes(cfg, fail):
    classes = cfg.data.classes
    if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)):
        fail("data.classes", f"data.classes = {classes} must list at least two distinct class "
                             f"ids >= 0")


# The task and its batches; the source, the long-tail draw, the recipe and the loader declare
# their own data.* keys (sources.py, longtail.py, augment.py, loaders.py).
CONFIG = Part({"data": {
    "batch_size": F("int", 128, ge=1, help="global batch, split over ranks"),
    "eval_batch_size": F("int", 512, ge=1),
    "check_files": F("bool", False, help="stat every listed image before training"),
    "val_per_class": F("int", 0, ge=0, help="make a balanced 'val' split of this many unused "
                                            "train images per class (array sources)"),
    "classes": F("list", None, nullable=True, item="int", ge=0,
                 help="a task of these source classes only, relabeled 0..k-1 in this "
                      "(head-to-tail) order; null = every class"),
}}, _check_classes, owner=__name__)
