"""Turn a decoded image of any common mode into the ``(H, W, 3)`` uint8 RGB array models expect.

Decoders return what the file holds: 16-bit or 32-bit grey levels, a grey channel with or
without alpha, RGBA, a palette. Converting these naively goes wrong in quiet ways; the best
known is Pillow's ``convert("RGB")`` of a 16-bit PNG, which clips every value above 255 and
so turns almost every pixel white. ``to_uint8_rgb`` (for arrays from any decoder) and
``pil_to_rgb`` (for Pillow images) map each case explicitly:

- 16-bit values (and 32-bit integers, as Pillow opens some 16-bit files) are rescaled from
  0..65535 to 0..255 with rounding, so the image keeps its real brightness;
- floats are taken as 0..1 (what decoders produce for float images) and scaled to 0..255;
- one grey channel is repeated into three, grey + alpha keeps the grey;
- alpha is dropped (the colour channels as stored), and a palette is expanded to its colours.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_MAX_16BIT = 65535

_CONVERT_TO_RGB = ("1", "CMYK", "YCbCr", "LAB", "HSV")
"""Pillow modes whose pixels are not plain channel values; Pillow converts them exactly."""


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Rescale an array of any pixel type to uint8 (see the module docstring)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        scaled = np.nan_to_num(array, nan=0.0).clip(0.0, 1.0) * 255.0
        return np.rint(scaled).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        wide = array.astype(np.int64).clip(0, _MAX_16BIT)
        return ((wide * 255 + _MAX_16BIT // 2) // _MAX_16BIT).astype(np.uint8)
    raise ValueError(f"images of pixel type {array.dtype} are not supported; use 8 or 16 bits")


def to_uint8_rgb(array: np.ndarray, bgr: bool = False) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB array from a decoded image array; always a writable array.

    Args:
        array: ``(H, W)`` grey, or ``(H, W, C)`` with C = 1 (grey), 2 (grey + alpha), 3 (colour)
            or 4 (colour + alpha); uint8, uint16, another integer type, bool or float (0..1).
        bgr: The colour channels are in OpenCV's blue-green-red order.

    Raises:
        ValueError: If the shape or pixel type is not one of those.
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"an image array must be (H, W) or (H, W, 1..4), got shape {tuple(array.shape)}"
        )
    channels = array.shape[2]
    if channels <= 2:
        array = np.repeat(array[:, :, :1], 3, axis=2)
    else:
        array = array[:, :, :3]
        if bgr:
            array = array[:, :, ::-1]
    result = np.ascontiguousarray(_to_uint8(array))
    return result if result.flags.writeable else result.copy()


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB array from a Pillow image of any mode.

    Raises:
        ValueError: If the pixel type is not supported.
    """
    if image.mode in ("P", "PA"):
        keeps_alpha = image.mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if keeps_alpha else "RGB")
    elif image.mode in _CONVERT_TO_RGB:
        image = image.convert("RGB")
    return to_uint8_rgb(np.asarray(image))


__all__ = ["pil_to_rgb", "to_uint8_rgb"]
