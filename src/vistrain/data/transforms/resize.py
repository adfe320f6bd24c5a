"""Resize keeping the aspect ratio, so the image fits a target size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import Transform, to_hw


def resize_image(image: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bilinear resize of a ``(3, H, W)`` float image to ``hw``.

    Shrinking uses an antialiasing filter so thin structures do not alias away.
    """
    if tuple(image.shape[-2:]) == hw:
        return image
    shrinking = hw[0] < image.shape[-2] or hw[1] < image.shape[-1]
    out = F.interpolate(
        image.unsqueeze(0), size=hw, mode="bilinear", align_corners=False, antialias=shrinking
    )
    return out.squeeze(0)


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
        old_hw = (int(image.shape[-2]), int(image.shape[-1]))
        new_hw, _ = keep_ratio_hw(old_hw, self.image_size)
        if new_hw != old_hw:
            sample[CommonKeys.images] = resize_image(image, new_hw)
            sample[CommonKeys.boxes2d] = scale_boxes(sample[CommonKeys.boxes2d], old_hw, new_hw)
        sample[CommonKeys.input_hw] = new_hw
        return sample
