"""Random affine warp (rotation, scale, shear, translation) with boxes from warped corners."""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import PAD_VALUE, Transform, check_range, to_hw
from vistrain.data.transforms.boxes import box_areas, clip_boxes, keep_visible
from vistrain.data.transforms.image import as_array, as_tensor, fill_colour, image_hw


def warp_array(
    array: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int], fill: float = PAD_VALUE
) -> np.ndarray:
    """Warp an ``(H, W, 3)`` uint8 array by the 3x3 ``matrix`` (input pixels -> output pixels).

    Bilinear ``cv2.warpAffine``; points that fall outside the input get ``fill``. The matrix
    uses continuous coordinates (pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``) while
    OpenCV puts pixel centres at whole numbers, so it is conjugated by a half-pixel shift:
    an identity matrix then reproduces the input exactly.
    """
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    unhalf = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    centred = unhalf @ matrix @ half
    return cv2.warpAffine(
        array,
        centred[:2],
        (out_hw[1], out_hw[0]),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill_colour(fill, array.shape[2]),
    )


def warp_boxes(boxes: Tensor, matrix: np.ndarray) -> Tensor:
    """Axis-aligned xyxy boxes around the four warped corners of each box."""
    if boxes.shape[0] == 0:
        return boxes.clone()
    corners = boxes.double().numpy()[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
    warped = corners @ matrix[:2, :2].T + matrix[:2, 2]
    out = np.concatenate([warped.min(axis=1), warped.max(axis=1)], axis=1)
    return torch.from_numpy(out).to(boxes.dtype)


class RandomAffine(Transform):
    """Rotate, scale, shear and translate the image by random amounts; boxes follow.

    The image centre is moved to the output centre, rotated by an angle in
    ``[-degrees, degrees]``, scaled by a factor in ``scale``, sheared by angles in
    ``[-shear, shear]`` along each axis and shifted by up to ``translate`` of the output size.
    Each box becomes the axis-aligned box around its four warped corners, clipped to the
    output; boxes under ``min_size`` pixels a side, keeping less than ``min_area_ratio`` of
    their warped area, or thinner than 1:``max_aspect`` are dropped. Pixels warped in from
    outside the input are grey 114.

    After :class:`~vistrain.data.transforms.mosaic.Mosaic`, ``output_size=image_size``
    crops the doubled mosaic canvas back to the training size (YOLOX's affine with border).

    Args:
        degrees: Largest rotation in degrees.
        translate: Largest shift as a fraction of the output size.
        scale: ``(min, max)`` zoom factor.
        shear: Largest shear angle in degrees.
        output_size: Output ``(h, w)``; ``None`` keeps the input size.
        min_size: Smallest box side kept, in pixels.
        min_area_ratio: Smallest kept fraction of a box's warped area.
        max_aspect: Largest kept box aspect ratio.
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.1, 2.0),
        shear: float = 2.0,
        output_size: int | tuple[int, int] | None = None,
        min_size: float = 2.0,
        min_area_ratio: float = 0.1,
        max_aspect: float = 20.0,
    ) -> None:
        if degrees < 0 or shear < 0 or not 0 <= translate <= 1:
            raise ValueError(
                f"degrees={degrees!r} and shear={shear!r} must be >= 0 and "
                f"translate={translate!r} in [0, 1]."
            )
        self.degrees = float(degrees)
        self.translate = float(translate)
        self.scale = check_range(scale, "scale")
        self.shear = float(shear)
        self.output_size = None if output_size is None else to_hw(output_size, "output_size")
        self.min_size = float(min_size)
        self.min_area_ratio = float(min_area_ratio)
        self.max_aspect = float(max_aspect)

    def random_matrix(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
        """Draw a 3x3 matrix mapping input pixel coordinates to output pixel coordinates."""
        angle = math.radians(random.uniform(-self.degrees, self.degrees))
        zoom = random.uniform(*self.scale)
        shear_x = math.tan(math.radians(random.uniform(-self.shear, self.shear)))
        shear_y = math.tan(math.radians(random.uniform(-self.shear, self.shear)))
        shift_x = random.uniform(-self.translate, self.translate) * out_hw[1]
        shift_y = random.uniform(-self.translate, self.translate) * out_hw[0]
        cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
        centre = np.array([[1, 0, -in_hw[1] / 2], [0, 1, -in_hw[0] / 2], [0, 0, 1]])
        rotate = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
        shear = np.array([[1, shear_x, 0], [shear_y, 1, 0], [0, 0, 1]])
        place = np.array(
            [[1, 0, out_hw[1] / 2 + shift_x], [0, 1, out_hw[0] / 2 + shift_y], [0, 0, 1]]
        )
        return place @ shear @ rotate @ centre

    def __call__(self, sample: DictData) -> DictData:
        """Warp the image and its boxes by a freshly drawn random matrix."""
        image: Tensor = sample[CommonKeys.images]
        in_hw = image_hw(image)
        out_hw = self.output_size or in_hw
        matrix = self.random_matrix(in_hw, out_hw)
        sample[CommonKeys.images] = as_tensor(warp_array(as_array(image), matrix, out_hw))
        sample[CommonKeys.input_hw] = out_hw
        boxes: Tensor = sample[CommonKeys.boxes2d]
        warped = warp_boxes(boxes, matrix)
        clipped = clip_boxes(warped, out_hw)
        area_scale = float(abs(np.linalg.det(matrix[:2, :2])))
        keep = keep_visible(
            clipped,
            box_areas(boxes) * area_scale,
            self.min_size,
            self.min_area_ratio,
            self.max_aspect,
        )
        sample[CommonKeys.boxes2d] = clipped[keep]
        sample[CommonKeys.boxes2d_classes] = sample[CommonKeys.boxes2d_classes][keep]
        return sample
