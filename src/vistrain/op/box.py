"""Box geometry in plain torch: conversions, IoU and class-wise NMS.

Boxes are ``(..., 4)`` float tensors. ``xyxy`` means ``(x1, y1, x2, y2)`` corners in pixels,
``cxcywh`` means centre and size. Nothing here needs torchvision, and every function is
differentiable where that makes sense (IoU) so the detection losses can reuse it.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-7


def _check_last_dim(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}.")
    if boxes.shape[-1] != 4:
        raise ValueError(
            f"{name} has shape {tuple(boxes.shape)}; the last dimension must be 4 "
            "(one box per row)."
        )


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert corner boxes ``(x1, y1, x2, y2)`` to ``(cx, cy, w, h)``."""
    _check_last_dim(boxes, "boxes")
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert centre boxes ``(cx, cy, w, h)`` to ``(x1, y1, x2, y2)``."""
    _check_last_dim(boxes, "boxes")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes; boxes with ``x2 < x1`` or ``y2 < y1`` have area 0."""
    _check_last_dim(boxes, "boxes")
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes.

    Leading batch dimensions broadcast: ``(..., N, 4)`` and ``(..., M, 4)`` give ``(..., N, M)``.
    A tiny epsilon in the union keeps degenerate boxes at IoU 0 instead of NaN.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter / (union + _EPS)


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of corresponding xyxy boxes: ``(..., 4)`` and ``(..., 4)`` give ``(...)``."""
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / (union + _EPS)


def _greedy_keep(iou: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS on an IoU matrix whose rows are sorted by descending score.

    Box ``i`` survives iff no surviving box ``j < i`` overlaps it by more than the
    threshold. That rule fixes ``keep[0]``, then ``keep[1]``, and so on; iterating
    ``keep = not any(keep[j] and overlaps[i, j])`` from "all kept" therefore settles on
    the exact greedy answer, one more settled prefix element per round at worst and
    in a handful of rounds in practice. Each round is one matrix-vector product, so
    no Python loop runs over the boxes.
    """
    n = iou.shape[0]
    earlier = torch.ones(n, n, dtype=torch.bool, device=iou.device).tril(diagonal=-1)
    suppressors = ((iou > iou_threshold) & earlier).to(torch.float32)
    keep = torch.ones(n, dtype=torch.bool, device=iou.device)
    for _ in range(n):
        new_keep = (suppressors @ keep.to(torch.float32)) == 0
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _check_nms_inputs(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    _check_last_dim(boxes, "boxes")
    if boxes.dim() != 2 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"nms expects boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} and "
            f"{tuple(scores.shape)}."
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold} must lie in [0, 1].")


def _nms(boxes: Tensor, scores: Tensor, class_ids: Tensor | None, iou_threshold: float) -> Tensor:
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    sorted_boxes = boxes[order].float()
    iou = box_iou(sorted_boxes, sorted_boxes)
    if class_ids is not None:
        sorted_classes = class_ids[order]
        iou = iou * (sorted_classes[:, None] == sorted_classes[None, :])
    return order[_greedy_keep(iou, iou_threshold)]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression of xyxy boxes.

    Args:
        boxes: ``(N, 4)`` xyxy boxes.
        scores: ``(N,)`` scores; higher wins (ties keep the earlier box first).
        iou_threshold: A box is dropped when its IoU with a kept, higher-scoring box
            is greater than this.

    Returns:
        Indices into ``boxes`` of the kept boxes, by descending score.

    Raises:
        ValueError: If the shapes disagree or the threshold is not in ``[0, 1]``.
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, class_ids: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: boxes of different classes never suppress each other.

    One IoU matrix covers all boxes; pairs of different classes are zeroed in it, so
    the result equals running ``nms`` per class and merging by score.

    Args:
        boxes: ``(N, 4)`` xyxy boxes.
        scores: ``(N,)`` scores.
        class_ids: ``(N,)`` integer class of each box.
        iou_threshold: See ``nms``.

    Returns:
        Indices of the kept boxes, by descending score.

    Raises:
        ValueError: If the shapes disagree or the threshold is not in ``[0, 1]``.
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    if class_ids.shape != boxes.shape[:1]:
        raise ValueError(
            f"class_ids has shape {tuple(class_ids.shape)}; expected ({boxes.shape[0]},), "
            "one class per box."
        )
    return _nms(boxes, scores, class_ids, iou_threshold)


def aligned_box_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of corresponding xyxy boxes (IoU minus the empty share of the hull)."""
    iou = aligned_box_iou(boxes1, boxes2)
    lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    inter_lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    inter_rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (inter_rb - inter_lt).clamp(min=0).prod(-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    return iou - (hull - union) / (hull + _EPS)
