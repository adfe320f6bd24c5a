"""Resize keeping the aspect ratio, so the image fits a target size."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import Transform, to_hw
from vistrain.data.transforms.image import as_array, as_tensor, image_hw


def resize_array(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 array to ``hw`` with OpenCV.

    Enlarging is bilinear; shrinking averages the covered source pixels (``INTER_AREA``), an
    antialiasing filter, so thin structures do not alias away. The same size is returned as
    it is.
    """
    if array.shape[:2] == hw:
        return array
    shrinking = hw[0] < array.shape[0] or hw[1] < array.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(array, (hw[1], hw[0]), interpolation=interpolation)


def keep_ratio_hw(hw: tuple[int, int], target: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """Size of an ``hw`` image scaled by one factor to fit inside ``target``, and the factor."""
    scale = min(target[0] / hw[0], target[1] / hw[1])
    new_hw = (max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale)))
    return new_hw, scale


def scale_boxes(boxes: Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> Tensor:
    """Scale xyxy ``boxes`` from an ``old_hw`` image to a ``new_hw`` one, per axis."""
    sx = new_hw[1] / old_hw[1]
    sy = new_hw[0] / old_hw[0]
    factors = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
    return boxes * factors


class ResizeKeepRatio(Transform):
    """Scale the image by one factor so it fits inside ``image_size``; boxes follow.

    The result is at most ``image_size`` in each dimension and touches it in at least one;
    ``input_hw`` becomes the new size. Because the boxes are scaled per axis by exactly
    ``new / old`` size, a prediction in input pixels maps back to the original image by
    dividing by ``input_hw / original_hw`` per axis (when this is the only geometric transform,
    as in the test pipe). Apply it before :class:`~vistrain.data.transforms.pad.Pad`.

    Args:
        image_size: Target ``(h, w)`` or a single int for a square.
    """

    def __init__(self, image_size: int | tuple[int, int]) -> None:
        self.image_size = to_hw(image_size)

    def __call__(self, sample: DictData) -> DictData:
        """Resize the image to fit ``image_size`` and scale the boxes."""
        image: Tensor = sample[CommonKeys.images]
        old_hw = image_hw(image)
        new_hw, _ = keep_ratio_hw(old_hw, self.image_size)
        if new_hw != old_hw:
            sample[CommonKeys.images] = as_tensor(resize_array(as_array(image), new_hw))
            sample[CommonKeys.boxes2d] = scale_boxes(sample[CommonKeys.boxes2d], old_hw, new_hw)
        sample[CommonKeys.input_hw] = new_hw
        return sample
