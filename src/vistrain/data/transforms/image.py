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

import cv2
import numpy as np
import torch
from torch import Tensor


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
    if image.dtype != torch.uint8 or image.requires_grad or image.device.type != "cpu":
        image = image.detach().cpu()
        if image.dtype != torch.uint8:
            image = image.round().clamp_(0.0, 255.0).to(torch.uint8)
    array = image.permute(1, 2, 0).numpy()
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def as_tensor(array: np.ndarray) -> Tensor:
    """The ``(3, H, W)`` uint8 tensor view of an ``(H, W, 3)`` uint8 array (no copy)."""
    if array.ndim == 2:  # OpenCV drops the channel axis of single-channel results
        array = array[:, :, None]
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return torch.from_numpy(array).permute(2, 0, 1)


def to_float_image(image: Tensor) -> Tensor:
    """The contiguous float32 ``(3, H, W)`` network input (0..255) of an image tensor.

    A uint8 image is split into its channel planes by OpenCV and each plane is widened into
    the output: about twice as fast as a strided ``Tensor.to`` from the interleaved bytes.
    The output is allocated by NumPy, whose allocator reuses freed blocks of this size where
    PyTorch's maps fresh pages (and pays their page faults) each time.
    """
    if image.dtype != torch.uint8:
        return image.to(torch.float32, memory_format=torch.contiguous_format)
    planes = cv2.split(as_array(image))
    out = np.empty((len(planes), *planes[0].shape), dtype=np.float32)
    for index, plane in enumerate(planes):
        out[index] = plane
    return torch.from_numpy(out)


def image_hw(image: Tensor) -> tuple[int, int]:
    """``(h, w)`` of a ``(C, H, W)`` image tensor."""
    return int(image.shape[-2]), int(image.shape[-1])


def fill_colour(value: float, channels: int = 3) -> tuple[float, ...]:
    """OpenCV's border colour for a grey ``value`` (rounded to a byte) on every channel."""
    byte = float(min(max(round(value), 0), 255))
    return (byte,) * channels
