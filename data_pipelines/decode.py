"""Decode only what the crop needs, for the torchvision backend's ImageNet-style recipes.

Why: the generic path (PIL full decode -> convert -> tensor -> v2 RandomResizedCrop ->
float -> Normalize -> per-sample collate) spends several copies of the full image on every
sample and cannot shrink the decode. Here each sample is

1. opened lazily (the header gives the size; nothing is decoded yet);
2. given its crop box in full-resolution coordinates, drawn by ``v2.RandomResizedCrop``'s
   own ``make_params`` from the header's size under the same per-sample seed as the generic
   path (or, for evaluation, the box that ``Resize(256/224 * size)`` + ``CenterCrop(size)``
   covers), then the flip drawn as ``v2.RandomHorizontalFlip`` draws it: the same geometry
   for the same seed, so the same statistics;
3. decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``) when the crop box is
   at least that many times larger than the output on both sides, so the result is never
   upsampled by the reduction; the box is mapped onto the reduced image;
4. cropped and resized in one PIL call (``resize(box=...)``, the same antialiased bilinear
   filter torchvision's tensor resize reproduces), flipped, and written as normalized float32
   straight into the batch (allocated in shared memory in a worker), with one batched
   ``__getitems__`` per batch instead of a per-sample collate.

Pixels differ from the generic path only by the bilinear filters' rounding (<= 1 level, full
decode) or, when the DCT reduction is used, by that reduction's box-like prefilter.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .augment import RRC_RATIO
from .flat import flatten_source
from .sources import DataError


def eval_box(height: int, width: int, size: int, resize: int) -> tuple[float, ...]:
    """(left, top, right, bottom) in source pixels of what ``Resize(resize)`` (shorter side)
    followed by ``CenterCrop(size)`` keeps, computed as torchvision computes both."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = resize, int(resize * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sy, sx = height / new_h, width / new_w
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def draft_scale(box_w: float, box_h: float, out: int) -> int:
    """The largest DCT reduction (1, 2, 4, 8) that keeps the crop at least ``out`` pixels on
    both sides: the crop is then still downscaled (or kept) afterwards, never upsampled."""
    for s in (8, 4, 2):
        if box_w / s >= out and box_h / s >= out:
            return s
    return 1


def decode_crop(path: str, box_of, out: int, edge: bool):
    """PIL image ``out`` x ``out`` of the file's crop; ``box_of(image)`` gives (left, top,
    right, bottom) in full-resolution pixels from the opened, not yet decoded image.
    ``edge``: the filter stops at the box (RandomResizedCrop crops, then resizes); else it
    reads the pixels around it (Resize, then CenterCrop)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        box = box_of(im)
        s = draft_scale(box[2] - box[0], box[3] - box[1], out)
        if s > 1 and im.format == "JPEG":
            got = im.draft(im.mode, (width // s, height // s))
            if got is not None:               # box of the reduced image, in source pixels
                fx, fy = got[1][2] / width, got[1][3] / height
                box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        if edge:   # the crop's border pixels repeat, as in crop-then-resize
            hull = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]),
                    math.ceil(box[3]))
            im = im.crop(hull)
            box = (box[0] - hull[0], box[1] - hull[1], box[2] - hull[0], box[3] - hull[1])
        img = im.resize((out, out), Image.BILINEAR, box=box)
    return img if img.mode == "RGB" else img.convert("RGB")


def supports(dataset, spec) -> bool:
    """Files with an ImageNet-style recipe (train crop, or eval resize + center crop)."""
    if not hasattr(dataset, "source") or getattr(dataset, "transform", None) is None:
        return False
    if flatten_source(dataset.source).kind != "files" or spec.channels not in (1, 3):
        return False
    if spec.kind == "imagenet":
        return True
    return spec.kind == "moco" and not spec.train and spec.size > 64   # moco eval = imagenet


class CropDecodeDataset(torch.utils.data.Dataset):
    """``dataset`` (files + ImageNet-style recipe) decoded by `decode_crop`, one batch per
    ``__getitems__`` call: (float32 [B, C, S, S] normalized, int64 [B])."""

    def __init__(self, dataset, spec):
        self.flat = flatten_source(dataset.source)
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.train, self.size, self.channels = spec.train, spec.size, spec.channels
        self.eval_resize, self.flip_p = spec.eval_resize, spec.flip_p
        if self.train:
            from torchvision.transforms import v2

            self.rrc = v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=RRC_RATIO)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        self.scale, self.bias = 1.0 / (255.0 * std), -mean / std

    def __len__(self) -> int:
        return len(self.flat)

    def _image(self, key, out: torch.Tensor) -> int:
        """Decode item ``key`` (index or (index, sample_seed)) into ``out``; its index."""
        if isinstance(key, (tuple, list)):
            index = int(key[0])
            with torch.random.fork_rng(devices=[]):   # the generic path's seeding
                torch.manual_seed(int(key[1]))
                img = self._decode(index)
        else:
            index = int(key)                          # unseeded: torch's RNG, as v2 does
            img = self._decode(index)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)   # np.array: writable
        if self.channels == 1:
            from torchvision.transforms.v2 import functional as TF

            x = TF.rgb_to_grayscale(x, num_output_channels=1)
        torch.mul(x, self.scale, out=out)
        out.add_(self.bias)
        return index

    def _decode(self, index: int):
        """The crop of item ``index`` as an RGB PIL image, flipped if drawn so."""
        from PIL import Image

        if self.train:
            def box_of(im):
                p = self.rrc.make_params([im])        # reads only the size
                return (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"])
        else:
            def box_of(im):
                return eval_box(im.size[1], im.size[0], self.size, self.eval_resize)
        try:
            img = decode_crop(self.flat.path(index), box_of, self.size, edge=self.train)
        except FileNotFoundError:
            raise DataError(f"{self.flat.describe(index)}: image file not found") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{self.flat.describe(index)}: cannot read image: {exc}; expected "
                            f"a readable image file") from exc
        if self.train and not torch.rand(1) >= self.flip_p:   # v2 flip's draw and test
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def _batch(self, n: int) -> torch.Tensor:
        shape = (n, self.channels, self.size, self.size)
        if torch.utils.data.get_worker_info() is None:
            return torch.empty(shape)
        return torch.empty(shape).share_memory_()   # sent to the main process without a copy

    def __getitem__(self, key):
        x, y = self.__getitems__([key])
        return x[0], y[0]

    def __getitems__(self, keys):
        out = self._batch(len(keys))
        index = [self._image(k, out[b]) for b, k in enumerate(keys)]
        return out, torch.from_numpy(self.labels[index])


def collate_batch(batch):
    """The batch `CropDecodeDataset.__getitems__` already assembled."""
    return batch
