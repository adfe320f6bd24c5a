"""The image forms a sample passes through: uint8 arrays for OpenCV, a float tensor at the end.

Inside a pipe, ``images`` is a ``(3, H, W)`` uint8 tensor that is a view of a C-contiguous
``(H, W, 3)`` RGB array, so each transform gets that array back without a copy
(:func:`as_array`), runs OpenCV on it (``warpAffine``, ``resize``, lookup tables: what
official YOLOX, mmdet and Ultralytics use) and wraps the result again (:func:`as_tensor`).
Byte arithmetic is several times cheaper than float arithmetic on the same pixels, and the
pipe converts to the float32 network input only once, at its end (:func:`to_float_image`).
Float ``(3, H, W)`` tensors in 0..255 are accepted too (rounded to bytes on the first
transform), so data sets and tests that build float images keep working.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vistrain.data.transforms.base import PAD_VALUE


def as_array(image: Tensor) -> np.ndarray:
    """A C-contiguous ``(H, W, 3)`` uint8 array of a ``(3, H, W)`` image tensor.

    A uint8 tensor made by :func:`as_tensor` gives back its array without copying; any other
    layout is copied, and float values are rounded and clipped to 0..255.

    Raises:
        ValueError: If ``image`` is not a ``(C, H, W)`` tensor.
    """
    if not isinstance(image, Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"images must be a (3, H, W) tensor, got {shape}.")
    if image.dtype != torch.uint8:
        image = image.detach().round().clamp_(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy())


def as_tensor(array: np.ndarray) -> Tensor:
    """The ``(3, H, W)`` uint8 tensor view of an ``(H, W, 3)`` uint8 array (no copy)."""
    if array.ndim == 2:  # OpenCV drops the channel axis of single-channel results
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def to_float_image(image: Tensor) -> Tensor:
    """The contiguous float32 ``(3, H, W)`` network input (0..255) of an image tensor."""
    return image.to(torch.float32, memory_format=torch.contiguous_format)


def image_hw(image: Tensor) -> tuple[int, int]:
    """``(h, w)`` of a ``(C, H, W)`` image tensor."""
    return int(image.shape[-2]), int(image.shape[-1])


def fill_colour(value: float, channels: int = 3) -> tuple[float, ...]:
    """OpenCV's border colour for a grey ``value`` (rounded to a byte) on every channel."""
    byte = float(min(max(round(value), 0), 255))
    return (byte,) * channels


def grey_canvas(hw: tuple[int, int], value: float = PAD_VALUE) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 array filled with the grey ``value`` (rounded to a byte)."""
    return np.full((hw[0], hw[1], 3), fill_colour(value, 1)[0], dtype=np.uint8)
