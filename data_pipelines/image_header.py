"""An encoded image's size from its header, without decoding (and without PIL for JPEGs).

Why: the crop of a random-resized-crop recipe is drawn from the image's size before anything
is decoded (DALI decodes only that window; the torchvision backend chooses how to decode
from it). Walking a JPEG's segment headers to its start-of-frame marker takes microseconds;
PIL's lazy open parses the same header in Python at ~50x that.
"""
from __future__ import annotations

import io

import numpy as np

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # start-of-frame markers


def jpeg_frame(data) -> tuple[int, int, int] | None:
    """(height, width, components) of a JPEG's frame, or None when ``data`` (bytes or a uint8
    array) is not a JPEG whose frame header can be read (a DNL height of 0 included)."""
    b = memoryview(data)
    if len(b) < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i, n = 2, len(b)
    while i + 10 <= n and b[i] == 0xFF:
        m = b[i + 1]
        if m == 0xFF:                           # fill byte
            i += 1
        elif m == 0x01 or 0xD0 <= m <= 0xD8:    # segments without a length
            i += 2
        elif m in _SOF:
            h, w = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
            return (h, w, int(b[i + 9])) if h and w else None
        elif m in (0xD9, 0xDA):                 # end, or scan data before any frame
            return None
        else:
            i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def encoded_hw(data: np.ndarray) -> tuple[int, int]:
    """(height, width) as stored in an encoded image: the JPEG frame header, else PIL's lazy
    open (header only); raises what PIL raises for what it cannot read."""
    frame = jpeg_frame(data)
    if frame is not None:
        return frame[0], frame[1]
    from PIL import Image

    with Image.open(io.BytesIO(data.tobytes())) as im:
        return im.size[1], im.size[0]
