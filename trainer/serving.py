"""The engine's side of a method's DataNeeds: it builds the method with what the method
declared (methods/base.py) and serves it, so no method opens data itself.

- `pool`: the unlabeled pool, built here and handed to the method's constructor;
- `unlabeled_batch`: an UnlabeledStream over the rows the method chose (`unlabeled_rows`), one
  batch per labeled batch, with its own sampler, epochs and DDP shards through the DataBundle
  (same backends and per-sample augmentation seeds as the labeled set); its position is part
  of the engine's checkpoint, so a killed run resumes on exactly the next pool batch;
- `pool_split`: the pool as an evaluation split (pseudo-labelling);
- `feature_cache`: the training set embedded once by `cache_encoder()` before the first epoch,
  so that a frozen-backbone method trains on features.
The config checks of what a method reads (pool keys, extra splits) run here too.
"""
from __future__ import annotations

import torch

from ltrainer.configspec import Part
from ltrainer.data_pipelines.datasets import AugmentedDataset
from ltrainer.data_pipelines.samplers import mix_seeds
from ltrainer.data_pipelines.sources import SubsetSource
from ltrainer.data_pipelines.unlabeled_pool import build_pool, check_pool

from .distributed import batch_to_device
from .extraction import cache_split
from .methods import METHODS, create_method, method_class
from .methods.base import Method, TaskShape
from .protocol import check_selection


class UnlabeledStream:
    """This rank's batches of pool images, walked on across run epochs (the pool, which may
    be larger than the labeled set, has its own epochs); drawn uniformly, in an order of its
    own (not the labeled one)."""

    def __init__(self, data, dataset, local_batch: int, seed: int, device, memory_format):
        self.data, self.dataset, self.local_batch = data, dataset, local_batch
        self.seed = mix_seeds(seed, 0x0B1A) >> 1
        self.device, self.memory_format = device, memory_format
        self.epoch = self.batch = 0
        self._iter = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next local batch (images on the device, labels: pseudo or -1)."""
        while True:
            if self._iter is None:
                loader, _ = self.data.sampled_loader(("unlabeled",), self.dataset, "uniform",
                                                     self.local_batch, self.seed, self.epoch,
                                                     self.batch)
                self._iter = iter(loader)
            try:
                images, labels = next(self._iter)
                break
            except StopIteration:
                self.epoch, self.batch, self._iter = self.epoch + 1, 0, None
        self.batch += 1
        return batch_to_device((images, labels), self.device, self.memory_format)

    def state_dict(self) -> dict:
        return {"unlabeled_epoch": self.epoch, "unlabeled_batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["unlabeled_epoch"]), int(state["unlabeled_batch"])
        self._iter = None


class Supply:
    """What the engine serves one method beyond the labeled loader."""

    def __init__(self, method: Method, data, stream: UnlabeledStream | None):
        self.method, self.data, self.stream = method, data, stream
        self.cached = not method.needs(method.cfg).feature_cache

    def before_epoch(self, embed, folder: str) -> None:
        """Embed the training set once (DataNeeds.feature_cache) with the engine's embed,
        sharded, into a float16 file in `folder` that every rank maps (extraction.cache_split):
        no rank gathers the split's features."""
        if self.cached:
            return
        source = cache_split(embed, "train", self.method.cache_encoder(), folder,
                             self.data.rank, len(self.data.train), self.data.num_classes)
        self.data.replace_train(AugmentedDataset(source, None))
        self.cached = True

    def unlabeled(self) -> tuple:
        return self.stream.next() if self.stream is not None else (None, None)


def build_method(cfg, data, device, memory_format=torch.contiguous_format
                 ) -> tuple[Method, Supply]:
    """The configured method and its Supply, built from what it declares."""
    needs = method_class(cfg).needs(cfg)
    method = create_declared(cfg, data, device)
    if needs.pool_split:
        data.evals[needs.pool_split] = data.make_dataset(method.pool.source, False)
    stream = None
    if needs.unlabeled_batch:
        stream = unlabeled_stream(cfg, data, method, needs.unlabeled_batch, device,
                                  memory_format)
    return method, Supply(method, data, stream)


def create_declared(cfg, data, device) -> Method:
    """The configured method with what its constructor takes (the pool, when needs() asks for
    it), without what only training serves (the unlabeled stream, the pool split): also how
    the bank tools rebuild a finished run's model (trainer/banks/runs.py)."""
    pool = build_pool(cfg.data, cfg.semi) if method_class(cfg).needs(cfg).pool else None
    return create_method(cfg, TaskShape.of(data), device, pool=pool)


def unlabeled_stream(cfg, data, method, u_global: int, device, memory_format):
    rows, labels = method.unlabeled_rows()
    pool = method.pool
    source = SubsetSource(pool.source, rows, labels=labels, num_classes=pool.num_classes)
    dataset = data.make_dataset(source, True)
    world = data.world_size
    if u_global % world:
        raise ValueError(f"semi.unlabeled_ratio x data.batch_size = {u_global} pool images "
                         f"per batch must be divisible by the number of processes ({world})")
    if len(dataset) < u_global:
        raise ValueError(f"the unlabeled pool keeps {len(dataset)} images, fewer than "
                         f"one batch of {u_global}: lower semi.unlabeled_ratio or the "
                         f"pseudo-label selection (semi.threshold, semi.top_k)")
    return UnlabeledStream(data, dataset, u_global // world, cfg.run.seed, device, memory_format)


def check_needs(cfg, fail) -> None:
    """Rules of what the chosen method reads: the pool's keys, and the extra splits it
    evaluates on (which must exist in the task)."""
    cls = METHODS.get(cfg.method.name)
    if cls is None:
        return
    if cls.needs(cfg).pool:
        check_pool(cfg, fail)
    for key in cls.eval_split_keys(cfg):   # they choose tau: held out from eval.split too
        section, name = key.split(".")
        check_selection(cfg, fail, key, cfg[section][name])   # trainer/protocol.py


CONFIG = Part({}, check_needs, owner=__name__)
