"""Mosaic: four samples tiled around a random centre on a canvas twice the target size."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import MultiSampleTransform, to_hw
from vistrain.data.transforms.boxes import box_areas, clip_boxes, keep_visible
from vistrain.data.transforms.image import as_array, as_tensor, grey_canvas, image_hw
from vistrain.data.transforms.resize import keep_ratio_hw, resize_array, scale_boxes


def paste(canvas: np.ndarray, tile: np.ndarray, top: int, left: int) -> tuple[int, int, int, int]:
    """Copy the ``(h, w, C)`` ``tile`` into ``canvas`` with its top-left at ``(top, left)``.

    ``top`` and ``left`` may be negative or push the tile past the canvas; only the overlap is
    copied.

    Returns:
        The canvas region written, as ``(y0, x0, y1, x1)`` (empty when ``y0 >= y1``).
    """
    ch, cw = canvas.shape[:2]
    th, tw = tile.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + th, ch), min(left + tw, cw)
    if y0 < y1 and x0 < x1:
        canvas[y0:y1, x0:x1] = tile[y0 - top : y1 - top, x0 - left : x1 - left]
    return y0, x0, y1, x1


class Mosaic(MultiSampleTransform):
    """Tile the current sample and three drawn ones around a random centre (YOLOX mosaic).

    Each of the four images is resized (keeping its aspect ratio) to fit ``image_size``, then
    placed in one quadrant around a centre drawn uniformly from the middle half of a canvas
    of twice ``image_size``, filled with grey 114: the current sample's bottom-right corner
    touches the centre, the second sample's bottom-left, the third's top-right and the
    fourth's top-left. Boxes move with their image and are clipped to the canvas; boxes with
    less than ``min_area_ratio`` of their area left or a side under ``min_size`` pixels are
    dropped. The output is ``2 * image_size`` large (``input_hw`` says so); a
    :class:`~vistrain.data.transforms.affine.RandomAffine` with ``output_size=image_size``
    usually follows to crop, rotate and scale it back down. Keys other than the image, boxes
    and ``input_hw`` (names, originals, image id) are those of the current sample.

    Args:
        image_size: The training input size ``(h, w)`` (or one int for a square).
        min_size: Smallest box side kept, in pixels.
        min_area_ratio: Smallest fraction of a box's area that must stay on the canvas.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        min_size: float = 2.0,
        min_area_ratio: float = 0.1,
    ) -> None:
        self.image_size = to_hw(image_size)
        self.min_size = float(min_size)
        self.min_area_ratio = float(min_area_ratio)

    def __call__(self, sample: DictData, draw: Callable[[], DictData]) -> DictData:
        """Tile ``sample`` with three samples from ``draw``."""
        h, w = self.image_size
        samples = [sample, draw(), draw(), draw()]
        yc = int(random.uniform(0.5 * h, 1.5 * h))
        xc = int(random.uniform(0.5 * w, 1.5 * w))
        canvas = grey_canvas((2 * h, 2 * w))
        all_boxes: list[Tensor] = []
        all_classes: list[Tensor] = []
        for index, part in enumerate(samples):
            image: Tensor = part[CommonKeys.images]
            old_hw = image_hw(image)
            (th, tw), _ = keep_ratio_hw(old_hw, self.image_size)
            tile = resize_array(as_array(image), (th, tw))
            top = yc - th if index in (0, 1) else yc
            left = xc - tw if index in (0, 2) else xc
            paste(canvas, tile, top, left)
            boxes = scale_boxes(part[CommonKeys.boxes2d], old_hw, (th, tw))
            boxes = boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)
            clipped = clip_boxes(boxes, (2 * h, 2 * w))
            keep = keep_visible(
                clipped, box_areas(boxes), self.min_size, self.min_area_ratio, float("inf")
            )
            all_boxes.append(clipped[keep])
            all_classes.append(part[CommonKeys.boxes2d_classes][keep])
        sample[CommonKeys.images] = as_tensor(canvas)
        sample[CommonKeys.input_hw] = (2 * h, 2 * w)
        sample[CommonKeys.boxes2d] = torch.cat(all_boxes)
        sample[CommonKeys.boxes2d_classes] = torch.cat(all_classes)
        return sample
