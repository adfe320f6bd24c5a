"""MixUp: blend the sample half and half with another, scaled and placed at random."""

from __future__ import annotations

import random
from collections.abc import Callable

import cv2
import numpy as np
import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import (
    PAD_VALUE,
    MultiSampleTransform,
    check_prob,
    check_range,
)
from vistrain.data.transforms.boxes import box_array, place_boxes, select_classes, set_boxes
from vistrain.data.transforms.flip import hflip_boxes
from vistrain.data.transforms.image import as_array, as_tensor, fill_colour, image_hw
from vistrain.data.transforms.resize import keep_ratio_hw, resize_array, scale_boxes


def blend_half(
    image: np.ndarray, tile: np.ndarray, top: int, left: int, mirror: bool = False
) -> np.ndarray:
    """The mean of ``image`` and a grey canvas with ``tile`` pasted at ``(top, left)``.

    Computed without building the canvas, each output pixel once: where the tile lies the
    image is averaged with it, elsewhere with grey (both rounded alike by OpenCV, which
    writes straight into the output's regions). With ``mirror`` the tile is pasted mirrored
    left-right; only its visible part is flipped.
    """
    grey = 0.5 * fill_colour(PAD_VALUE, 1)[0]
    height, width = image.shape[:2]
    tile_h, tile_w = tile.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + tile_h, height), min(left + tile_w, width)
    if y0 >= y1 or x0 >= x1:
        return cv2.convertScaleAbs(image, alpha=0.5, beta=grey)
    out = np.empty_like(image)
    for ys, xs in (  # the bands around the covered rectangle
        (slice(0, y0), slice(0, width)),
        (slice(y1, height), slice(0, width)),
        (slice(y0, y1), slice(0, x0)),
        (slice(y0, y1), slice(x1, width)),
    ):
        if ys.start < ys.stop and xs.start < xs.stop:
            cv2.convertScaleAbs(image[ys, xs], dst=out[ys, xs], alpha=0.5, beta=grey)
    rows = slice(y0 - top, y1 - top)
    if mirror:  # column c of the mirrored tile is column tile_w - 1 - c of the tile
        covered = cv2.flip(tile[rows, tile_w - (x1 - left) : tile_w - (x0 - left)], 1)
    else:
        covered = tile[rows, x0 - left : x1 - left]
    cv2.addWeighted(image[y0:y1, x0:x1], 0.5, covered, 0.5, 0.0, dst=out[y0:y1, x0:x1])
    return out


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
        boxes = scale_boxes(box_array(other[CommonKeys.boxes2d]), other_hw, new_hw)
        mirror = random.random() < self.flip_prob
        if mirror:
            boxes = hflip_boxes(boxes, new_hw[1])
        top = random.randint(min(0, hw[0] - new_hw[0]), max(0, hw[0] - new_hw[0]))
        left = random.randint(min(0, hw[1] - new_hw[1]), max(0, hw[1] - new_hw[1]))
        clipped, keep = place_boxes(boxes, left, top, hw, self.min_size, self.min_area_ratio)
        blend = blend_half(as_array(image), tile, top, left, mirror)
        sample[CommonKeys.images] = as_tensor(blend)
        set_boxes(
            sample,
            np.concatenate([box_array(sample[CommonKeys.boxes2d]), clipped[keep]]),
            torch.cat(
                [
                    sample[CommonKeys.boxes2d_classes],
                    select_classes(other[CommonKeys.boxes2d_classes], keep),
                ]
            ),
        )
        return sample
