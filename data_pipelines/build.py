"""From the `data` section of a config to datasets and loaders the engine can iterate.

The engine asks for a training loader per epoch by sampler kind (a train rule may switch from
uniform to class-balanced sampling mid-run) and for evaluation loaders by split. Loaders are
built once per kind and re-pointed at each epoch through `sampler.set_epoch`, so worker
processes are not restarted every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .augment import DEFAULT_STATS, build_transform
from .datasets import AugmentedDataset
from .longtail import class_counts, make_lt_subset
from .samplers import SequentialSampler, build_sampler
from .sources import DataError, open_source
from .torchvision_loader import build_torchvision_loader

# SVHN-LT in the reference puts label 0 last in the head-to-tail order.
CLASS_ORDER = {"svhn": [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]}
EVAL_SPLIT_NAMES = {"test": "test", "val": "val"}


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
    _loaders: dict = field(default_factory=dict)

    @property
    def local_batch(self) -> int:
        return self.cfg["batch_size"] // self.world_size

    def train_loader(self, kind: str, epoch: int, start_batch: int = 0, class_weights=None):
        """(loader, sampler) positioned at `start_batch` of `epoch`."""
        if kind not in self._loaders:
            sampler = build_sampler(kind, self.train.source.labels, batch_size=self.local_batch,
                                    world_size=self.world_size, rank=self.rank, seed=self.seed,
                                    class_weights=class_weights)
            loader = build_torchvision_loader(self.train, sampler, self.local_batch,
                                              self.cfg["workers"], self.seed + 7919 * self.rank)
            self._loaders[kind] = (loader, sampler)
        loader, sampler = self._loaders[kind]
        sampler.set_epoch(epoch, start_batch)
        return loader, sampler

    def eval_loader(self, split: str):
        key = ("eval", split)
        if key not in self._loaders:
            if split not in self.evals:
                raise DataError(f"no '{split}' split: data.source = {self.cfg['source']!r} "
                                f"provides {', '.join(self.evals) or 'none'}")
            ds = self.evals[split]
            sampler = SequentialSampler(len(ds), self.world_size, self.rank)
            bs = max(1, self.cfg["eval_batch_size"] // self.world_size)
            self._loaders[key] = build_torchvision_loader(ds, sampler, bs, self.cfg["workers"],
                                                          self.seed)
        return self._loaders[key]


def _open(cfg, split: str):
    list_key = {"train": "train_list", "val": "val_list", "test": "test_list"}[split]
    return open_source(cfg["source"], cfg["root"], split, cfg.get(list_key),
                       num_classes=cfg.get("num_classes"))


def build_data(cfg, rank: int = 0, world_size: int = 1, seed: int = 0,
               eval_splits=("test",)) -> DataBundle:
    """Open the train split (made long-tailed as configured) and the evaluation splits."""
    train_src = _open(cfg, "train")
    if cfg["imbalance"] != "none":
        train_src = make_lt_subset(train_src, n_max=cfg["n_max"], rho=cfg["rho"],
                                   profile=cfg["imbalance"], seed=cfg["lt_seed"],
                                   class_order=CLASS_ORDER.get(cfg["source"]))
    stats_name = cfg["stats"] or cfg["source"]
    if stats_name not in DEFAULT_STATS:
        raise DataError(f"data.stats = {stats_name!r}: no normalization statistics by that name; "
                        f"choose one of {', '.join(DEFAULT_STATS)}")
    mean, std = DEFAULT_STATS[stats_name]
    in_channels = len(mean)

    def dataset(src, train):
        t = build_transform(cfg["augment"], train, cfg["image_size"], mean, std, in_channels)
        return AugmentedDataset(src, t)

    evals = {split: dataset(_open(cfg, split), False) for split in eval_splits}
    counts = class_counts(train_src.labels, train_src.num_classes)
    return DataBundle(cfg, dataset(train_src, True), evals, train_src.num_classes, in_channels,
                      counts, rank, world_size, seed)
