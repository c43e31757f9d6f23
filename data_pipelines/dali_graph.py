"""The DALI backend's augmentation recipes as DALI operators, and the crop windows the feeder
draws for them from our per-sample seeds.

Why the windows are drawn here and not by DALI: DALI's random-crop operators draw from its own
per-pipeline RNG, so a sample's window would depend on the pipeline's history (not
reproducible per sample, not the other backends' window). The feeder instead computes each
window with batch_aug.rrc_params's algorithm (torchvision's, on our splitmix64 draws) from the
image's size (the array's shape, or the encoded file's header) and hands (anchor, shape) to
the graph through external_source; a JPEG is then still decoded only in that window
(``decoders.image_slice``, libjpeg-turbo's ROI decoding). The seed of view v is
``view_seeds(seed, v)``, as in the torchvision backend's MoCo views, so one seed gives the
same window in both.

EXIF orientation: DALI's decoders would rotate by it (``adjust_orientation`` is on by
default), PIL and thus the other backends do not; the decoders here are told not to, so the
header's stored height and width are the decoded image's.
"""
from __future__ import annotations


import numpy as np
from nvidia.dali import fn, types

from .augment import RRC_RATIO, AugmentSpec
from .batch_aug import rrc_windows, view_seeds
from .image_header import encoded_hw
from .sources import DataError

# The resize after the crop: antialiased linear (a triangle filter scaled to the reduction
# when downscaling, as torchvision's antialias=True bilinear), chosen by the profile in
# README's "Benchmarks".
RESIZE = {"interp_type": types.INTERP_LINEAR, "antialias": True}


def crop_views(spec: AugmentSpec) -> tuple:
    """(view, scale) of each random resized crop the recipe takes from an image."""
    scale = spec.crop_scale
    return () if scale is None else tuple((v, scale) for v in range(spec.views))


def window_draws(spec: AugmentSpec, seeds: np.ndarray, sizes: list) -> list:
    """Per view, [anchors, shapes]: int32 (top, left) and (height, width) per sample, from
    the images' (height, width) ``sizes``."""
    out = []
    for view, scale in crop_views(spec):
        win = rrc_windows(view_seeds(seeds, view), sizes, scale, RRC_RATIO).astype(np.int32)
        out += [np.ascontiguousarray(win[:, :2]), np.ascontiguousarray(win[:, 2:])]
    return out


def image_size(arr: np.ndarray, encoded: bool) -> tuple:
    """((height, width), None), or (None, why the size cannot be read): an array's shape,
    or an encoded file's header (a file whose header does not parse is a bad image)."""
    if not encoded:
        return tuple(arr.shape[:2]), None
    try:
        return encoded_hw(arr), None
    except Exception as exc:  # noqa: BLE001  (PIL raises many kinds)
        return None, f"cannot read its size from the header: {type(exc).__name__}: {exc}"



def _to_channels(img, have: int, want: int):
    if have == want:
        return img
    if have == 3 and want == 1:
        return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(img, img, img, axis=2)


def _normalize(img, spec: AugmentSpec, mirror=None, crop=None):
    kwargs = dict(dtype=types.FLOAT, output_layout="CHW",
                  mean=[m * 255.0 for m in spec.mean], std=[s * 255.0 for s in spec.std])
    if mirror is not None:
        kwargs["mirror"] = mirror
    if crop is not None:
        kwargs["crop"] = crop
    return fn.crop_mirror_normalize(img, **kwargs)


def _resized(img, size: int, window=None):
    """The image, or its ``window`` (anchor and shape nodes, "HW"), resized to size x size.
    A window is the resize's region of interest rather than a slice first: no copy (3% less
    CPU for MoCo's two views in tools/profile_dali.py); its filter then reads the real pixels just outside the window where
    crop-then-resize repeats the edge (the outermost output pixels differ, as they did with
    DALI's own random_resized_crop, which resizes the same way)."""
    if window is None:
        return fn.resize(img, resize_x=size, resize_y=size, **RESIZE)
    start = fn.cast(window[0], dtype=types.FLOAT)
    return fn.resize(img, resize_x=size, resize_y=size, roi_start=start,
                     roi_end=start + fn.cast(window[1], dtype=types.FLOAT), roi_relative=False,
                     **RESIZE)


def graph(spec: AugmentSpec, raw, encoded: bool, in_channels: int, gpu: bool, fixed_size,
          mirror=None, start=None, windows=()):
    """The augmentation recipe as DALI operators; returns the normalized NCHW (or 2-view)
    node (uint8 views for MoCo). ``mirror`` / ``start`` / ``windows``: the seeded flips,
    "small" crop corners and (anchor, shape) node pairs per crop view, from the feeder."""
    s, kind = spec.size, spec.kind
    decode = dict(device="mixed" if gpu else "cpu", adjust_orientation=False,
                  output_type=types.GRAY if spec.channels == 1 else types.RGB)
    have = 1 if spec.channels == 1 else 3

    if encoded and kind == "imagenet" and spec.train:
        # Decode only the crop window (libjpeg-turbo / nvJPEG ROI decoding), then resize.
        img = fn.decoders.image_slice(raw, *windows[0], axis_names="HW", normalized_anchor=False,
                                      normalized_shape=False, **decode)
        return _normalize(_to_channels(_resized(img, s), have, spec.channels), spec,
                          mirror=mirror)
    if encoded:
        img = fn.decoders.image(raw, **decode)
    else:
        img = raw.gpu() if gpu else raw
        have = in_channels

    if kind == "moco" and spec.train:   # uint8 CHW views: colour, blur, flip come after DALI
        return fn.stack(*[fn.transpose(_resized(img, s, w), perm=[2, 0, 1], output_layout="CHW")
                          for w in windows])
    if kind in ("imagenet", "moco"):
        if spec.train:  # imagenet, from arrays
            img = _resized(img, s, windows[0])
            return _normalize(_to_channels(img, have, spec.channels), spec, mirror=mirror)
        img = fn.resize(img, resize_shorter=spec.eval_resize)
        return _normalize(_to_channels(img, have, spec.channels), spec, crop=[s, s])
    if kind == "small":
        img = _to_channels(img, have, spec.channels)
        if spec.train:   # the corner and flip of batch_aug.small_crop_params (seeded)
            img = fn.slice(img, start=start, shape=[s, s], axes=[0, 1],
                           out_of_bounds_policy="pad")
            return _normalize(img, spec, mirror=mirror)
        if fixed_size == (s, s):
            return _normalize(img, spec)
        return _normalize(img, spec, crop=[s, s])
    if kind == "none":
        return _normalize(_to_channels(img, have, spec.channels), spec)
    raise DataError(f"DALI loader: no recipe for data.augment = {kind!r}")
