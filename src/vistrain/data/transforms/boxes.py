"""Box arithmetic shared by the geometric transforms: clipping and dropping lost boxes."""

from __future__ import annotations

import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys


def clip_boxes(boxes: Tensor, hw: tuple[int, int]) -> Tensor:
    """Clip xyxy ``boxes`` to an image of size ``hw`` (new tensor)."""
    h, w = hw
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0.0, float(w))
    out[:, 1::2] = out[:, 1::2].clamp(0.0, float(h))
    return out


def box_areas(boxes: Tensor) -> Tensor:
    """Areas of xyxy ``boxes`` (zero for degenerate ones)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0.0)
    return wh[:, 0] * wh[:, 1]


def keep_visible(
    boxes: Tensor,
    reference_areas: Tensor,
    min_size: float = 2.0,
    min_area_ratio: float = 0.1,
    max_aspect: float = 20.0,
) -> Tensor:
    """Mask of boxes that still show enough of their object after a transform.

    A box is kept if both sides are at least ``min_size`` pixels, its area is at least
    ``min_area_ratio`` of ``reference_areas`` (the area the whole object would have after
    the transform without clipping) and its aspect ratio is below ``max_aspect``.
    """
    wh = boxes[:, 2:] - boxes[:, :2]
    w, h = wh[:, 0], wh[:, 1]
    area = w.clamp(min=0.0) * h.clamp(min=0.0)
    aspect = torch.maximum(w / h.clamp(min=1e-6), h / w.clamp(min=1e-6))
    return (
        (w >= min_size)
        & (h >= min_size)
        & (area >= min_area_ratio * reference_areas)
        & (aspect < max_aspect)
    )


def select_boxes(sample: DictData, keep: Tensor) -> None:
    """Keep only the boxes (and their classes) where ``keep`` is true, in place."""
    sample[CommonKeys.boxes2d] = sample[CommonKeys.boxes2d][keep]
    sample[CommonKeys.boxes2d_classes] = sample[CommonKeys.boxes2d_classes][keep]


def empty_boxes() -> tuple[Tensor, Tensor]:
    """An empty ``(0, 4)`` float32 box tensor and its ``(0,)`` long class tensor."""
    return torch.zeros((0, 4), dtype=torch.float32), torch.zeros((0,), dtype=torch.long)
