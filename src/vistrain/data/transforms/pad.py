"""Pad the image at the bottom and right to a fixed size or a multiple of a stride."""

from __future__ import annotations

import math

import cv2
import numpy as np
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import PAD_VALUE, Transform, to_hw
from vistrain.data.transforms.image import as_array, as_tensor, fill_colour, image_hw


def pad_array(array: np.ndarray, hw: tuple[int, int], value: float = PAD_VALUE) -> np.ndarray:
    """Pad an ``(H, W, C)`` uint8 array at the bottom and right to ``hw`` with ``value``."""
    pad_h = hw[0] - array.shape[0]
    pad_w = hw[1] - array.shape[1]
    if pad_h == 0 and pad_w == 0:
        return array
    colour = fill_colour(value, array.shape[2])
    return cv2.copyMakeBorder(array, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=colour)


class Pad(Transform):
    """Pad at the bottom and right so the image has a fixed size (or a multiple of one).

    Content keeps its pixel coordinates, so boxes and ``input_hw`` do not change; the network
    sees ``value`` (YOLOX's grey 114) in the padded area.

    Args:
        image_size: Target ``(h, w)`` (or one int for a square). Exclusive with
            ``size_divisor``.
        size_divisor: Pad each side up to the next multiple of this instead.
        value: Fill value in 0..255 (rounded to a whole byte).

    Raises:
        ValueError: If neither or both of ``image_size`` and ``size_divisor`` are given,
            ``size_divisor`` is not positive, or (when called) the image is larger than
            ``image_size``.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] | None = None,
        size_divisor: int | None = None,
        value: float = PAD_VALUE,
    ) -> None:
        if (image_size is None) == (size_divisor is None):
            raise ValueError(
                f"Pad needs exactly one of image_size={image_size!r} and "
                f"size_divisor={size_divisor!r}."
            )
        if size_divisor is not None and size_divisor <= 0:
            raise ValueError(f"size_divisor={size_divisor!r} must be a positive int.")
        self.image_size = None if image_size is None else to_hw(image_size)
        self.size_divisor = size_divisor
        self.value = float(value)

    def target_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The padded size of an image of size ``hw``."""
        if self.image_size is not None:
            if hw[0] > self.image_size[0] or hw[1] > self.image_size[1]:
                raise ValueError(
                    f"Cannot pad an image of size {hw} to the smaller image_size "
                    f"{self.image_size}; resize it first (ResizeKeepRatio)."
                )
            return self.image_size
        div = int(self.size_divisor or 1)
        return (math.ceil(hw[0] / div) * div, math.ceil(hw[1] / div) * div)

    def __call__(self, sample: DictData) -> DictData:
        """Pad the image; boxes and ``input_hw`` stay as they are."""
        image: Tensor = sample[CommonKeys.images]
        hw = image_hw(image)
        target = self.target_hw(hw)
        if target != hw:
            sample[CommonKeys.images] = as_tensor(pad_array(as_array(image), target, self.value))
        return sample
