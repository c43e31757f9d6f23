"""Image transforms (torchvision.transforms.v2) for the paper's two recipes.

"small" is the CIFAR/SVHN recipe of the reference (pad-4 random crop + flip), "imagenet" the
classifier-balancing one (random resized crop + flip; resize 256/224 + center crop for eval).
Every pipeline first turns its input (uint8 CHW tensor or PIL image) into a tv_tensors.Image,
so array and file sources share the same code path, and all randomness comes from torch's RNG
(which AugmentedDataset seeds per sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ltrainer.configspec import F, Registry

from .batch_aug import BatchAugment, rrc_params, small_crop_params, view_seeds

# name -> (mean, std), on images scaled to [0, 1].
DEFAULT_STATS = {
    # Computed once from the 60,000 training images:
    #   python -c "import gzip,numpy as np; x=np.frombuffer(gzip.open('/usr/share/datasets/
    #   fashion-mnist/train-images-idx3-ubyte.gz').read(),np.uint8,offset=16)/255;
    #   print(x.mean(), x.std())"   ->  0.2860405969887955 0.35302424451492254
    "fashion_mnist": ([0.2860406], [0.3530242]),
    # The reference code uses these CIFAR-10 values for both CIFAR-10 and CIFAR-100
    # (imbalanced-semi-self train.py); we keep them for comparable numbers.
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    # The reference normalizes SVHN with 0.5 / 0.5.
    "svhn": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "inat": ([0.466, 0.471, 0.380], [0.195, 0.194, 0.192]),
}


# ----------------------------------------------------------------------------- the spec
# Every recipe's parameters, declared once: torchvision (below), DALI (dali_loader.py) and
# FFCV (ffcv_loader.py / ffcv_ops.py) implement them natively where they can; MoCo's colour
# and blur stages and the final normalisation run in batch_aug.py for every backend.
RRC_SCALE = (0.08, 1.0)      # RandomResizedCrop, "imagenet" train
RRC_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
EVAL_RESIZE = 256 / 224      # eval: shorter side to size * 256/224, then center crop
# MoCo v2 "aug+": RandomResizedCrop(scale 0.2-1) -> ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 ->
# RandomGrayscale p=0.2 -> GaussianBlur(sigma 0.1-2) p=0.5 -> flip -> normalize.
MOCO = {"scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "gray_p": 0.2,
        "blur_sigma": (0.1, 2.0), "blur_p": 0.5}


def moco_blur_kernel(size: int) -> int:
    """Odd Gaussian window about 10% of the crop side (23 px at 224, as in SimCLR/MoCo v2)."""
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


@dataclass(frozen=True)
class AugmentSpec:
    """What a backend must do to one image: the recipe, its size and the normalization."""
    kind: str               # small | imagenet | moco | none
    train: bool
    size: int
    mean: tuple             # per model channel, on [0, 1] images
    std: tuple
    channels: int           # channels the model takes (1 or 3)
    pad: int = 4            # "small": padding of the random crop

    @property
    def views(self) -> int:
        return 2 if (self.kind == "moco" and self.train) else 1

    @property
    def eval_resize(self) -> int:
        """Shorter side before the center crop (256 for 224, as torchvision's Resize)."""
        return int(self.size * EVAL_RESIZE)

    @property
    def crop_scale(self):
        """RandomResizedCrop's area range when the recipe has one (train imagenet / moco)."""
        if self.train and self.kind in ("imagenet", "moco"):
            return MOCO["scale"] if self.kind == "moco" else RRC_SCALE
        return None

    @property
    def flip(self) -> bool:
        return self.train and self.kind in ("small", "imagenet", "moco")

    @property
    def flip_p(self) -> float:
        return FLIP_P

    @property
    def moco(self) -> dict:
        """MoCo v2 aug+'s parameters (batch_aug.py reads them from here)."""
        return MOCO

    @property
    def blur_kernel(self) -> int:
        return moco_blur_kernel(self.size)

    @property
    def colour(self) -> bool:
        """MoCo's jitter / grayscale / blur stage (batch_aug.py, shared by every backend)."""
        return self.train and self.kind == "moco"


def augment_spec(cfg, train: bool, in_channels: int) -> AugmentSpec:
    """The spec of one split from the data config (data.augment, image_size, stats)."""
    from .sources import DataError

    kind = cfg["augment"]
    if kind not in AUGMENTS:
        raise DataError(f"data.augment = {kind!r}: unknown augmentation; expected one of "
                        f"{', '.join(AUGMENTS)}")
    stats = cfg.get("stats") or cfg["source"]
    if stats not in DEFAULT_STATS:
        raise DataError(f"data.stats = {stats!r}: no normalization statistics by that name")
    mean, std = DEFAULT_STATS[stats]
    return AugmentSpec(kind, bool(train), int(cfg["image_size"]), tuple(map(float, mean)),
                       tuple(map(float, std)), int(in_channels))


class MatchChannels(torch.nn.Module):
    """Give the image the model's channel count (gray -> RGB by repeat, RGB -> gray by luma).

    Lets a list of RGB files feed a 1-channel model and Fashion-MNIST feed a 3-channel one.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"MatchChannels: expected 1 or 3 channels, got {channels}")
        self.channels = channels

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        c = img.shape[-3]
        if c == self.channels:
            return img
        if c == 1 and self.channels == 3:
            return TF.grayscale_to_rgb(img)
        if c == 3 and self.channels == 1:
            return TF.rgb_to_grayscale(img, num_output_channels=1)
        raise ValueError(f"MatchChannels: cannot turn a {c}-channel image into "
                         f"{self.channels} channels")


class SmallImageTransform:
    """The "small" recipe (pad-4 random crop + flip, then normalize) for uint8 CHW tensors,
    about 10x faster than the equivalent v2.Compose on 28/32 px images.

    Its randomness is a pure function of the per-sample seed (no RNG state is touched), so
    AugmentedDataset can skip saving and restoring torch's RNG for every sample; at 2 cores the
    generic path spent more time on that than the model spent on ResNet-8.
    """
    takes_seed = True

    def __init__(self, train: bool, image_size: int, mean, std, in_channels: int,
                 padding: int = 4):
        self.train, self.size, self.pad = train, image_size, padding
        self.match = MatchChannels(in_channels)
        self.mean_list, self.std_list = tuple(map(float, mean)), tuple(map(float, std))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255)

    def crop_params(self, seed: int, height: int, width: int) -> tuple[int, int, bool]:
        """(top, left, flip) in padded coordinates (batch_aug.small_crop_params)."""
        return small_crop_params(seed, height, width, self.size, self.pad)

    prefer_batched = False   # the per-sample normalisation is cheap; batched on a GPU only

    def crops_only(self):
        stage = BatchAugment(AugmentSpec("small", self.train, self.size, self.mean_list,
                                         self.std_list, self.match.channels))
        return CropsOnly(self.crops, stage, takes_seed=True)

    def __call__(self, img, seed: int | None = None) -> torch.Tensor:
        return (self.crops(img, seed).float() - self.mean) * self.inv_std

    def crops(self, img, seed: int | None = None) -> torch.Tensor:
        """The uint8 crop [C, H, W] (before normalisation)."""
        x = img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img)
        x = self.match(x.as_subclass(torch.Tensor))
        if self.train:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            top, left, flip = self.crop_params(seed, x.shape[-2], x.shape[-1])
            p = self.pad
            x = torch.nn.functional.pad(x, (p, p, p, p))[:, top:top + self.size,
                                                           left:left + self.size]
            if flip:
                x = x.flip(-1)
        elif x.shape[-2:] != (self.size, self.size):
            x = TF.center_crop(x, [self.size, self.size])
        return x


def build_transform(kind: str, train: bool, image_size: int, mean: Sequence[float],
                    std: Sequence[float], in_channels: int):
    """Build the train or eval pipeline ending in a normalized float32 CHW tensor."""
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"build_transform: expected mean and std with in_channels="
                         f"{in_channels} values, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"build_transform: std values must be positive, got {list(std)}")
    if kind not in AUGMENTS:
        raise ValueError(f"build_transform: unknown kind {kind!r}; expected one of "
                         f"{TRANSFORM_KINDS}")
    return AUGMENTS[kind](train, image_size, mean, std, in_channels)


def _small(train, image_size, mean, std, in_channels):
    return SmallImageTransform(train, image_size, mean, std, in_channels)


def _imagenet(train, image_size, mean, std, in_channels):
    """RandomResizedCrop + flip; resize 256/224 + center crop for evaluation."""
    ops: list = [v2.ToImage(), MatchChannels(in_channels)]
    if train:
        ops += [v2.RandomResizedCrop(image_size, scale=RRC_SCALE, ratio=RRC_RATIO, antialias=True),
                v2.RandomHorizontalFlip(FLIP_P)]
    else:
        ops += [v2.Resize(int(image_size * EVAL_RESIZE), antialias=True),
                v2.CenterCrop(image_size)]
    return TvRecipe(ops, AugmentSpec("imagenet", train, image_size, tuple(map(float, mean)),
                                     tuple(map(float, std)), in_channels))


def _moco(train, image_size, mean, std, in_channels):
    """Two aug+ views for training; evaluation as "small" up to 64 px, else as "imagenet"."""
    if train:
        return MocoViews(image_size, mean, std, in_channels)
    fn = _small if image_size <= 64 else _imagenet
    return fn(False, image_size, mean, std, in_channels)


def _none(train, image_size, mean, std, in_channels):
    return TvRecipe([v2.ToImage(), MatchChannels(in_channels)],
                    AugmentSpec("none", train, image_size, tuple(map(float, mean)),
                                tuple(map(float, std)), in_channels))


class TvRecipe:
    """torchvision v2 ops, then normalisation; ``crops_only`` stops at uint8 and leaves the
    normalisation to batch_aug.BatchAugment on the batch (on the GPU: gpu_input.py)."""
    takes_seed = False
    prefer_batched = False

    def __init__(self, ops: list, spec: AugmentSpec):
        self.crops_t = v2.Compose(ops)
        self.transform = v2.Compose(ops + _normalize(spec.mean, spec.std))
        self.spec = spec

    def __call__(self, img):
        return self.transform(img)

    def crops(self, img) -> torch.Tensor:
        return self.crops_t(img).as_subclass(torch.Tensor)

    def crops_only(self):
        return CropsOnly(self.crops, BatchAugment(self.spec), takes_seed=False)


class CropsOnly:
    """A recipe's per-sample part (uint8 out); ``stage`` is the batched rest."""

    def __init__(self, crops, stage: BatchAugment, takes_seed: bool):
        self.crops, self.stage, self.takes_seed = crops, stage, takes_seed

    def __call__(self, img, *seed):
        return self.crops(img, *seed)


def _check_stats(cfg, fail):
    d = cfg.data
    if d.stats is None and d.source not in DEFAULT_STATS:
        fail("data.source", f"data.source = '{d.source}' has no normalization statistics of its "
                           f"own: set data.stats to one of {', '.join(DEFAULT_STATS)}")


# Every recipe reads the image size and the normalization; a backend (loaders.py) implements
# each recipe by name.
AUGMENTS = Registry("data.augment", default="small", help="augmentation recipe", check=_check_stats,
                    config={"data": {
                        "image_size": F("int", 28, ge=1),
                        "stats": F("str", None, tuple(DEFAULT_STATS), nullable=True,
                                   help="normalization stats name; null = the source's"),
                    }})
AUGMENTS.add("small", _small)         # the CIFAR/SVHN recipe: pad-4 random crop + flip
AUGMENTS.add("imagenet", _imagenet)   # classifier-balancing's random resized crop + flip
AUGMENTS.add("moco", _moco)           # MoCo v2's two aug+ views
AUGMENTS.add("none", _none)           # normalize only
TRANSFORM_KINDS = tuple(AUGMENTS)


def _normalize(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(map(float, mean)), std=list(map(float, std)))]


class MocoViews:
    """MoCo v2's two aug+ views of one image, [2, C, H, W] (a batch is [B, 2, C, H, W]).

    The random resized crop is torchvision's algorithm with draws from the sample's seed
    (batch_aug.rrc_params); flip, colour jitter, grayscale, blur and normalisation are
    batch_aug.py's shared stage, the one DALI and FFCV use too. On 1-channel images
    saturation, hue and grayscale have no meaning and are left out.
    """
    takes_seed = True
    prefer_batched = True    # the colour stage is much cheaper on whole batches

    def __init__(self, image_size: int, mean, std, in_channels: int):
        self.spec = AugmentSpec("moco", True, int(image_size), tuple(map(float, mean)),
                                tuple(map(float, std)), int(in_channels))
        self.stage = BatchAugment(self.spec, flip=True)

    def __call__(self, img, seed: int | None = None) -> torch.Tensor:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        return self.stage(self.crops(img, seed)[None], np.array([seed]))[0]

    def crops(self, img, seed: int) -> torch.Tensor:
        """The two uint8 crops [2, C, H, W] (before colour, flip and normalisation)."""
        x = img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img)
        x = x.as_subclass(torch.Tensor)
        s, views = self.spec.size, []
        for v in range(2):
            i, j, h, w = rrc_params(int(view_seeds([seed], v)[0]), x.shape[-2], x.shape[-1],
                                    MOCO["scale"], RRC_RATIO)
            views.append(TF.resized_crop(x, i, j, h, w, [s, s], antialias=True))
        return torch.stack(views)

    def crops_only(self):
        return CropsOnly(self.crops, self.stage, takes_seed=True)
