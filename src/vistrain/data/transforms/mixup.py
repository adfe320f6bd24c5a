"""MixUp: blend the sample half and half with another, scaled and placed at random."""

from __future__ import annotations

import random
from collections.abc import Callable

import cv2
import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import (
    MultiSampleTransform,
    check_prob,
    check_range,
)
from vistrain.data.transforms.boxes import box_areas, clip_boxes, keep_visible
from vistrain.data.transforms.flip import hflip_boxes
from vistrain.data.transforms.image import as_array, as_tensor, grey_canvas, image_hw
from vistrain.data.transforms.mosaic import paste
from vistrain.data.transforms.resize import keep_ratio_hw, resize_array, scale_boxes


class MixUp(MultiSampleTransform):
    """Blend the current sample with one drawn sample, keeping the boxes of both.

    The drawn image is resized to fit the current one (keeping its aspect ratio), zoomed by a
    factor from ``scale``, flipped with probability ``flip_prob`` and placed at a random
    offset (cropped where it overhangs, grey 114 where it does not cover) on a canvas the
    size of the current image. The result is the pixel-wise mean of the two images; its boxes
    are the current ones followed by the drawn ones that stay visible (see ``min_size`` and
    ``min_area_ratio``). The current sample's other keys are kept.

    Args:
        scale: ``(min, max)`` zoom applied to the drawn image after fitting.
        prob: Chance of mixing; when it does not mix, no sample is drawn.
        flip_prob: Chance of mirroring the drawn image.
        min_size: Smallest box side kept, in pixels.
        min_area_ratio: Smallest fraction of a drawn box's area that must stay on the canvas.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.5, 1.5),
        prob: float = 1.0,
        flip_prob: float = 0.5,
        min_size: float = 2.0,
        min_area_ratio: float = 0.1,
    ) -> None:
        self.scale = check_range(scale, "scale")
        self.prob = check_prob(prob, "prob")
        self.flip_prob = check_prob(flip_prob, "flip_prob")
        self.min_size = float(min_size)
        self.min_area_ratio = float(min_area_ratio)

    def __call__(self, sample: DictData, draw: Callable[[], DictData]) -> DictData:
        """Maybe blend ``sample`` with one sample from ``draw``."""
        if random.random() >= self.prob:
            return sample
        other = draw()
        image: Tensor = sample[CommonKeys.images]
        hw = image_hw(image)
        other_image: Tensor = other[CommonKeys.images]
        other_hw = image_hw(other_image)
        _, fit = keep_ratio_hw(other_hw, hw)
        zoom = fit * random.uniform(*self.scale)
        new_hw = (max(1, round(other_hw[0] * zoom)), max(1, round(other_hw[1] * zoom)))
        tile = resize_array(as_array(other_image), new_hw)
        boxes = scale_boxes(other[CommonKeys.boxes2d], other_hw, new_hw)
        if random.random() < self.flip_prob:
            tile = cv2.flip(tile, 1)
            boxes = hflip_boxes(boxes, new_hw[1])
        top = random.randint(min(0, hw[0] - new_hw[0]), max(0, hw[0] - new_hw[0]))
        left = random.randint(min(0, hw[1] - new_hw[1]), max(0, hw[1] - new_hw[1]))
        canvas = grey_canvas(hw)
        paste(canvas, tile, top, left)
        boxes = boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)
        clipped = clip_boxes(boxes, hw)
        keep = keep_visible(
            clipped, box_areas(boxes), self.min_size, self.min_area_ratio, float("inf")
        )
        blend = cv2.addWeighted(as_array(image), 0.5, canvas, 0.5, 0.0)
        sample[CommonKeys.images] = as_tensor(blend)
        sample[CommonKeys.boxes2d] = torch.cat([sample[CommonKeys.boxes2d], clipped[keep]])
        sample[CommonKeys.boxes2d_classes] = torch.cat(
            [sample[CommonKeys.boxes2d_classes], other[CommonKeys.boxes2d_classes][keep]]
        )
        return sample
