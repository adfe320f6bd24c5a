"""Box arithmetic shared by the geometric transforms: clipping and dropping lost boxes.

Boxes travel in samples as ``(N, 4)`` float32 tensors; the transforms do their arithmetic
on the NumPy views of those tensors (:func:`box_array`, no copy), since a handful of boxes
costs more in per-call overhead than in arithmetic and NumPy's overhead is several times
smaller than PyTorch's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vistrain.common.typing import DictData
from vistrain.data.const import CommonKeys


def box_array(boxes: Tensor) -> np.ndarray:
    """The ``(N, 4)`` float32 NumPy array of a box tensor (a view when already float32)."""
    if boxes.dtype != torch.float32 or boxes.requires_grad or boxes.device.type != "cpu":
        boxes = boxes.detach().cpu().float()
    return boxes.numpy().reshape(-1, 4)


def clip_boxes(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Clip xyxy ``boxes`` to an image of size ``hw`` (new array)."""
    limits = np.array([hw[1], hw[0], hw[1], hw[0]], dtype=boxes.dtype)
    return np.minimum(np.maximum(boxes, 0.0), limits)  # ufuncs: cheaper than np.clip


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of xyxy ``boxes`` (zero for degenerate ones)."""
    wh = np.maximum(boxes[:, 2:] - boxes[:, :2], 0.0)
    return wh[:, 0] * wh[:, 1]


def keep_visible(
    boxes: np.ndarray,
    reference_areas: np.ndarray,
    min_size: float = 2.0,
    min_area_ratio: float = 0.1,
    max_aspect: float = 20.0,
) -> np.ndarray:
    """Mask of boxes that still show enough of their object after a transform.

    A box is kept if both sides are at least ``min_size`` pixels, its area is at least
    ``min_area_ratio`` of ``reference_areas`` (the area the whole object would have after
    the transform without clipping) and its aspect ratio is below ``max_aspect``.
    """
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    # Sides >= min_size > 0 make the area and aspect below well defined where they matter.
    keep = (w >= min_size) & (h >= min_size) & (w * h >= min_area_ratio * reference_areas)
    if max_aspect != float("inf"):
        keep &= (w < max_aspect * h) & (h < max_aspect * w)
    return keep


def place_boxes(
    boxes: np.ndarray,
    left: int,
    top: int,
    canvas_hw: tuple[int, int],
    min_size: float,
    min_area_ratio: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Shift boxes by ``(left, top)`` onto a canvas, clip them, and mark those still visible.

    Used where an image is pasted, uncropped, onto a larger or offset canvas (mosaic, mixup):
    a box is kept when at least ``min_area_ratio`` of it stays on the canvas.

    Returns:
        The clipped boxes (all of them) and the boolean mask of those to keep.
    """
    moved = boxes + np.array([left, top, left, top], dtype=boxes.dtype)
    clipped = clip_boxes(moved, canvas_hw)
    keep = keep_visible(clipped, box_areas(moved), min_size, min_area_ratio, float("inf"))
    return clipped, keep


def select_classes(classes: Tensor, keep: np.ndarray) -> Tensor:
    """The entries of a ``(N,)`` class tensor where the boolean array ``keep`` is true."""
    return torch.from_numpy(classes.numpy(force=True)[keep])


def set_boxes(sample: DictData, boxes: np.ndarray, classes: Tensor) -> None:
    """Store ``boxes`` (float32 array) and their class tensor in ``sample``."""
    sample[CommonKeys.boxes2d] = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32))
    sample[CommonKeys.boxes2d_classes] = classes
