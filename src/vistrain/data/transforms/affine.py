"""Random affine warp (rotation, scale, shear, translation) with boxes from warped corners."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys
from vistrain.data.transforms.base import PAD_VALUE, Transform, check_range, to_hw
from vistrain.data.transforms.boxes import box_areas, clip_boxes, keep_visible


def warp_image(
    image: Tensor, matrix: Tensor, out_hw: tuple[int, int], fill: float = PAD_VALUE
) -> Tensor:
    """Warp a ``(C, H, W)`` image by the 3x3 ``matrix`` (input pixels -> output pixels).

    Uses bilinear sampling at output pixel centres; points that fall outside the input get
    ``fill``.
    """
    in_h, in_w = image.shape[-2:]
    out_h, out_w = out_hw
    # Compose: output-normalised -> output pixels -> input pixels -> input-normalised.
    from_out_norm = torch.tensor(
        [[out_w / 2, 0, out_w / 2], [0, out_h / 2, out_h / 2], [0, 0, 1]], dtype=torch.float64
    )
    to_in_norm = torch.tensor(
        [[2 / in_w, 0, -1], [0, 2 / in_h, -1], [0, 0, 1]], dtype=torch.float64
    )
    theta = to_in_norm @ torch.linalg.inv(matrix.double()) @ from_out_norm
    grid = F.affine_grid(
        theta[:2].float().unsqueeze(0), [1, image.shape[0], out_h, out_w], align_corners=False
    )
    shifted = (image - fill).unsqueeze(0)
    warped = F.grid_sample(
        shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped.squeeze(0) + fill


def warp_boxes(boxes: Tensor, matrix: Tensor) -> Tensor:
    """Axis-aligned xyxy boxes around the four warped corners of each box."""
    if boxes.shape[0] == 0:
        return boxes.clone()
    x0, y0, x1, y1 = boxes.double().unbind(1)
    xs = torch.stack([x0, x1, x1, x0], dim=1)
    ys = torch.stack([y0, y0, y1, y1], dim=1)
    m = matrix.double()
    wx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    wy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    out = torch.stack([wx.min(1).values, wy.min(1).values, wx.max(1).values, wy.max(1).values], 1)
    return out.to(boxes.dtype)


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

    def random_matrix(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
        """Draw a 3x3 matrix mapping input pixel coordinates to output pixel coordinates."""
        angle = math.radians(random.uniform(-self.degrees, self.degrees))
        zoom = random.uniform(*self.scale)
        shear_x = math.tan(math.radians(random.uniform(-self.shear, self.shear)))
        shear_y = math.tan(math.radians(random.uniform(-self.shear, self.shear)))
        shift_x = random.uniform(-self.translate, self.translate) * out_hw[1]
        shift_y = random.uniform(-self.translate, self.translate) * out_hw[0]
        cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
        centre = torch.tensor(
            [[1, 0, -in_hw[1] / 2], [0, 1, -in_hw[0] / 2], [0, 0, 1]], dtype=torch.float64
        )
        rotate = torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], dtype=torch.float64)
        shear = torch.tensor([[1, shear_x, 0], [shear_y, 1, 0], [0, 0, 1]], dtype=torch.float64)
        place = torch.tensor(
            [[1, 0, out_hw[1] / 2 + shift_x], [0, 1, out_hw[0] / 2 + shift_y], [0, 0, 1]],
            dtype=torch.float64,
        )
        return place @ shear @ rotate @ centre

    def __call__(self, sample: DictData) -> DictData:
        """Warp the image and its boxes by a freshly drawn random matrix."""
        image: Tensor = sample[CommonKeys.images]
        in_hw = (int(image.shape[-2]), int(image.shape[-1]))
        out_hw = self.output_size or in_hw
        matrix = self.random_matrix(in_hw, out_hw)
        sample[CommonKeys.images] = warp_image(image, matrix, out_hw)
        sample[CommonKeys.input_hw] = out_hw
        boxes: Tensor = sample[CommonKeys.boxes2d]
        warped = warp_boxes(boxes, matrix)
        clipped = clip_boxes(warped, out_hw)
        area_scale = float(abs(torch.linalg.det(matrix[:2, :2])))
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
