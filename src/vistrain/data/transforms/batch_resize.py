"""Resizing a collated batch: images, their sizes and their boxes, on the device.

The multi-scale training of YOLOX resizes whole batches after collation (every rank to the
same size, see ``YOLOXSyncRandomResizeCallback``). Unlike the per-sample transforms of this
package it works on float ``(B, 3, H, W)`` tensors with ``F.interpolate`` and never moves
data to the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys

__all__ = ["resize_view"]


def _scale_hw(hw: Any, scale_y: float, scale_x: float) -> Any:
    """Scale one ``(h, w)`` entry (tuple, list or tensor), keeping its type."""
    if isinstance(hw, Tensor):  # (2,) or (B, 2); python-scalar factors, no host-device copy
        scaled_hw = hw.to(torch.float64, copy=True)
        scaled_hw[..., 0] *= scale_y
        scaled_hw[..., 1] *= scale_x
        return scaled_hw.round_().to(hw.dtype)
    scaled = (round(hw[0] * scale_y), round(hw[1] * scale_x))
    return list(scaled) if isinstance(hw, list) else scaled


def resize_view(view: DictData, size: tuple[int, int]) -> None:
    """Resize one batch dict in place to ``size`` = (h, w).

    Images are resized bilinearly (``align_corners=False``); every ``input_hw`` entry and
    every box (xyxy pixels) is scaled by the same factors. Nothing here synchronises with
    the device. A view already at ``size`` is left untouched.
    """
    images = view[CommonKeys.images]
    height, width = int(images.shape[-2]), int(images.shape[-1])
    if (height, width) == size:
        return
    scale_y, scale_x = size[0] / height, size[1] / width
    if images.is_floating_point():
        resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    else:
        resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        resized = resized.round_().to(images.dtype)
    view[CommonKeys.images] = resized
    if CommonKeys.input_hw in view:
        input_hw = view[CommonKeys.input_hw]
        if isinstance(input_hw, Tensor):
            view[CommonKeys.input_hw] = _scale_hw(input_hw, scale_y, scale_x)
        else:
            view[CommonKeys.input_hw] = [_scale_hw(hw, scale_y, scale_x) for hw in input_hw]
    if CommonKeys.boxes2d in view:
        scaled_boxes = []
        for boxes in view[CommonKeys.boxes2d]:
            boxes = boxes.clone()
            boxes[..., 0::2] *= scale_x
            boxes[..., 1::2] *= scale_y
            scaled_boxes.append(boxes)
        view[CommonKeys.boxes2d] = scaled_boxes
