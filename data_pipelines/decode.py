"""Decode only what the crop needs, for the torchvision backend's ImageNet-style recipes.

Why: the generic path (PIL full decode -> convert -> tensor -> v2 RandomResizedCrop ->
float -> Normalize -> per-sample collate) spends several copies of the full image on every
sample and cannot shrink the decode. Here each sample is

1. read once; its size taken from the header (image_header.jpeg_frame for JPEGs, without
   PIL; PIL's lazy open otherwise): nothing is decoded yet;
2. given its crop box in full-resolution coordinates, drawn by ``v2.RandomResizedCrop``'s
   own ``make_params`` from the header's size under the same per-sample seed as the generic
   path (or, for evaluation, the box that ``Resize(256/224 * size)`` + ``CenterCrop(size)``
   covers), then the flip drawn as ``v2.RandomHorizontalFlip`` draws it: the same geometry
   for the same seed, so the same statistics;
3. decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``Image.draft``) when the crop box is
   at least that many times larger than the output on both sides, so the result is never
   upsampled by the reduction; the box is mapped onto the reduced image;
4. cropped and resized: an integer box (the train crop at full resolution) of a colour JPEG
   decoded alone by jpeg_window.c (libjpeg-turbo's partial decompression: the rows above the
   box entropy-decoded only, nothing below it, most columns beside it skipped; the full
   decode's pixels), else by OpenCV when installed (the whole file; the same pixels as PIL,
   ~25% less CPU), and resized by torch's uint8 antialiased bilinear kernel on the HWC
   pixels, which is what the generic path runs (identical pixels) at about half PIL's cost;
   a fractional box (reduced decode, eval) by PIL's ``resize(box=...)`` (the same filter,
   within 1 level); then flipped and written as normalized float32 straight into the batch
   (in a worker: a reused shared-memory slot, batch_ring.py, else a fresh segment), with
   one batched ``__getitems__`` per batch instead of a per-sample collate. The per-sample
   seed goes to the CPU generator only (``torch.manual_seed`` also queues CUDA seeding and
   formats a stack each time: ~1 ms a sample).

With the reduced decode, pixels differ from the generic path by that reduction's box-like
prefilter (see tests/test_decode.py for the tolerances).
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch

from .augment import RRC_RATIO
from .batch_ring import SlotTask
from .flat import flatten_source
from .image_header import jpeg_frame
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


def decode_crop(path: str, box_of, out: int, edge: bool) -> torch.Tensor:
    """uint8 [C, out, out] (C = 3, or 1 for a gray file) of the file's crop; ``box_of(width,
    height)`` gives (left, top, right, bottom) in full-resolution pixels (called once, before
    anything is decoded). ``edge``: the filter stops at the box (RandomResizedCrop crops, then
    resizes); else it reads the pixels around it (Resize, then CenterCrop)."""
    data = np.fromfile(path, dtype=np.uint8)       # read once: header, then decode
    window = _window() if edge else None
    cv2 = _cv2() if edge and window is None else None   # OpenCV only imported to replace it
    frame = jpeg_frame(data) if window or cv2 else None
    if frame is not None and frame[2] == 3:        # a colour JPEG: no PIL at all
        height, width = frame[0], frame[1]
        box = box_of(width, height)
        if (draft_scale(box[2] - box[0], box[3] - box[1], out) == 1
                and all(float(v).is_integer() for v in box)
                and b"\xff\xd9" in data[-64:].tobytes()):   # truncated: PIL raises
            if window is not None:
                return _crop_resize_window(window, data, box, out)
            return _crop_resize_cv2(cv2, data, box, height, width, out)
        return _decode_pil(data, lambda w, h: box, out, edge)
    return _decode_pil(data, box_of, out, edge)


def _crop_resize_window(window, data, box, out: int) -> torch.Tensor:
    """Only the box decoded (jpeg_window.c: the rows above it entropy-decoded only, nothing
    below it, the columns beside it mostly skipped), then torch's uint8 antialiased resize."""
    left, top, right, bottom = (int(v) for v in box)
    hwc = np.empty((bottom - top, right - left, 3), np.uint8)
    window.decode(data, top, left, bottom - top, right - left, hwc)
    return _resize_u8(torch.from_numpy(hwc), out)


def _crop_resize_cv2(cv2, data, box, height: int, width: int, out: int) -> torch.Tensor:
    """OpenCV's libjpeg-turbo decode (the same pixels as PIL's, ~25% less CPU, no copy out),
    the integer box cut, torch's uint8 antialiased resize (as the generic path's)."""
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape[:2] != (height, width):
        raise ValueError("OpenCV cannot decode it")
    t, b, l, r = (int(v) for v in (box[1], box[3], box[0], box[2]))
    return _resize_u8(torch.from_numpy(bgr)[t:b, l:r], out).flip(0)   # BGR -> RGB


def _decode_pil(data, box_of, out: int, edge: bool) -> torch.Tensor:
    """PIL's path: any format; a JPEG reduced in the DCT domain when the box allows."""
    from PIL import Image

    with Image.open(io.BytesIO(data.tobytes())) as im:
        width, height = im.size
        box = box_of(width, height)
        s = draft_scale(box[2] - box[0], box[3] - box[1], out)
        if s > 1 and im.format == "JPEG":
            got = im.draft(im.mode, (width // s, height // s))
            if got is not None:               # box of the reduced image, in source pixels
                fx, fy = got[1][2] / width, got[1][3] / height
                box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        if not (edge and all(float(v).is_integer() for v in box)):
            return _crop_resize_pil(im, box, out, edge)
        # An integer box (the train crop at full resolution): torch's uint8 antialiased
        # resize (AVX2, ~2x faster than PIL's) on the HWC pixels, no resampling at the edges
        t, b, l, r = (int(v) for v in (box[1], box[3], box[0], box[2]))
        return _resize_u8(_hwc(im)[t:b, l:r], out)


def _crop_resize_pil(im, box, out: int, edge: bool) -> torch.Tensor:
    """A fractional box resized by PIL (the same filter): uint8 [C, out, out]."""
    from PIL import Image

    if edge:   # the crop's border pixels repeat, as in crop-then-resize
        hull = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
        im = im.crop(hull)
        box = (box[0] - hull[0], box[1] - hull[1], box[2] - hull[0], box[3] - hull[1])
    return _hwc(im.resize((out, out), Image.BILINEAR, box=box)).permute(2, 0, 1)


_WINDOW: list = []


def _window():
    """The compiled window decoder (jpeg_window.c, built by ``pip install`` when gcc and
    libjpeg-turbo's headers are there), else None: OpenCV or PIL decode the whole file."""
    if not _WINDOW:
        try:
            from . import jpeg_window
        except ImportError:
            jpeg_window = None
        _WINDOW.append(jpeg_window)
    return _WINDOW[0]


def decoder_name() -> str:
    """Which decoder the train crops of colour JPEGs get, for logs and benchmarks."""
    if _window() is not None:
        return "window (libjpeg-turbo partial decode)"
    return "OpenCV (whole file)" if _cv2() is not None else "PIL (whole file)"


_CV2: list = []


def _cv2():
    """OpenCV when installed (it comes with FFCV), single-threaded; else None (PIL decodes)."""
    if not _CV2:
        try:
            import cv2

            cv2.setNumThreads(1)
            _CV2.append(cv2)
        except ImportError:
            _CV2.append(None)
    return _CV2[0]


def _hwc(im) -> torch.Tensor:
    """The decoded pixels as uint8 [H, W, C] (one copy, out of PIL; never written to)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # "not writable": only read
        a = torch.from_numpy(np.asarray(im))
    return a if a.dim() == 3 else a[:, :, None]


def _resize_u8(hwc: torch.Tensor, out: int) -> torch.Tensor:
    """[C, out, out] uint8: antialiased bilinear, as torchvision's tensor resize."""
    x = hwc.permute(2, 0, 1)[None]                      # channels-last: the fast kernel
    return torch.nn.functional.interpolate(x, size=(out, out), mode="bilinear",
                                           antialias=True, align_corners=False)[0]


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
            with torch.random.fork_rng(devices=[]):   # the generic path's seeding, CPU only:
                torch.default_generator.manual_seed(int(key[1]))   # torch.manual_seed also
                img = self._decode(index)   # queues CUDA seeding, formatting a stack (~1 ms)
        else:
            index = int(key)                          # unseeded: torch's RNG, as v2 does
            img = self._decode(index)
        x = img
        if self.channels == 1 and x.shape[0] == 3:
            from torchvision.transforms.v2 import functional as TF

            x = TF.rgb_to_grayscale(x, num_output_channels=1)
        torch.mul(x, self.scale, out=out)
        out.add_(self.bias)
        return index

    def _decode(self, index: int) -> torch.Tensor:
        """The crop of item ``index``, uint8 [C, S, S], flipped if drawn so."""
        if self.train:
            def box_of(width, height):                # make_params reads only the size
                p = self.rrc.make_params([torch.empty(1, 1, 1).expand(1, height, width)])
                return (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"])
        else:
            def box_of(width, height):
                return eval_box(height, width, self.size, self.eval_resize)
        try:
            img = decode_crop(self.flat.path(index), box_of, self.size, edge=self.train)
            if img.shape[0] == 1 and self.channels == 3:
                img = img.expand(3, -1, -1)           # gray file: RGB by repeat
        except FileNotFoundError:
            raise DataError(f"{self.flat.describe(index)}: image file not found") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{self.flat.describe(index)}: cannot read image: {exc}; expected "
                            f"a readable image file") from exc
        if self.train and not torch.rand(1) >= self.flip_p:   # v2 flip's draw and test
            img = img.flip(-1)
        return img

    def _batch(self, n: int) -> torch.Tensor:
        shape = (n, self.channels, self.size, self.size)
        if torch.utils.data.get_worker_info() is None:
            return torch.empty(shape)
        # in shared memory from the start (as default_collate does): sent without a copy
        storage = torch.empty(0)._typed_storage()._new_shared(math.prod(shape))
        return torch.empty(0).new(storage).view(shape)

    def __getitem__(self, key):
        x, y = self.__getitems__([key])
        return x[0], y[0]

    def __getitems__(self, keys):
        """(batch, labels); for a `batch_ring.SlotTask` with a slot, the batch is written
        into ``self.ring`` (set by build_torchvision_loader) and only its slot returned."""
        slot = None
        if isinstance(keys, SlotTask):
            slot, keys = keys
        out = self._batch(len(keys)) if slot is None else self.ring[slot, :len(keys)]
        index = [self._image(k, out[b]) for b, k in enumerate(keys)]
        return out if slot is None else slot, torch.from_numpy(self.labels[index])


def collate_batch(batch):
    """The batch `CropDecodeDataset.__getitems__` already assembled."""
    return batch

