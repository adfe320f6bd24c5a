"""Random horizontal flip."""

from __future__ import annotations

import random

import cv2
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import Transform, check_prob
from vistrain.data.transforms.image import as_array, as_tensor


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy ``boxes`` in an image ``width`` pixels wide."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


class RandomHorizontalFlip(Transform):
    """Mirror the image left-right with probability ``prob``; boxes follow.

    Apply it before padding: it mirrors the whole tensor, padding included.

    Args:
        prob: Chance of flipping, drawn from Python's :mod:`random`.
    """

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = check_prob(prob, "prob")

    def __call__(self, sample: DictData) -> DictData:
        """Maybe mirror the image and its boxes."""
        if random.random() >= self.prob:
            return sample
        image: Tensor = sample[CommonKeys.images]
        sample[CommonKeys.images] = as_tensor(cv2.flip(as_array(image), 1))
        sample[CommonKeys.boxes2d] = hflip_boxes(sample[CommonKeys.boxes2d], int(image.shape[-1]))
        return sample
