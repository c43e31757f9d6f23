"""Map-style dataset that applies a transform with a per-sample seed.

Keys from the training samplers are ``(index, sample_seed)``; seeding torch's RNG from the
seed inside ``fork_rng`` makes each augmentation reproducible regardless of which worker,
rank or resume point produced it, and leaves the caller's global RNG untouched.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch


def _to_tensor(img) -> torch.Tensor:
    """Plain CHW tensor from a tensor, tv_tensor or PIL image (used when transform is None)."""
    if isinstance(img, torch.Tensor):
        return img.as_subclass(torch.Tensor)
    from torchvision.transforms.v2 import functional as TF

    return TF.pil_to_tensor(img)


class AugmentedDataset(torch.utils.data.Dataset):
    """``source`` items through ``transform``; returns (image tensor, int64 label tensor)."""

    def __init__(self, source, transform=None):
        self.source = source
        self.transform = transform
        self.labels = source.labels
        self.num_classes = source.num_classes

    def __len__(self) -> int:
        return len(self.source)

    def _apply(self, index: int) -> torch.Tensor:
        img = self.source.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return _to_tensor(img)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            if len(key) != 2:
                raise TypeError(f"AugmentedDataset: expected key int or (index, sample_seed), "
                                f"got {key!r}")
            index, sample_seed = int(key[0]), int(key[1])
            if self.transform is None:                        # nothing random to seed
                img = self._apply(index)
            elif getattr(self.transform, "takes_seed", False):  # seeded without touching RNG
                img = _to_tensor(self.transform(self.source.load(index), sample_seed))
            else:
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also queues CUDA's lazy
                    # seeding, which records a stack trace (~1 ms a sample)
                    torch.default_generator.manual_seed(sample_seed & ((1 << 63) - 1))
                    img = self._apply(index)
        elif isinstance(key, (numbers.Integral, np.integer)):
            index = int(key)
            img = self._apply(index)
        else:
            raise TypeError(f"AugmentedDataset: expected key int or (index, sample_seed), "
                            f"got {type(key).__name__}")
        label = torch.tensor(int(self.labels[index]), dtype=torch.int64)
        return img, label
