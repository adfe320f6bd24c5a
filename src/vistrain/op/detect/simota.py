"""SimOTA label assignment (YOLOX paper, section 2.2 "SimOTA").

For every ground-truth box, SimOTA picks its positive anchor points from the current
predictions, not from fixed rules:

1. Centre prior: only anchor points inside some ground-truth box, or within
   ``center_radius`` strides of its centre, are candidates.
2. Cost of pairing ground truth ``g`` with anchor ``a``: the classification BCE of the
   joint score ``sqrt(sigmoid(cls) * sigmoid(obj))`` against ``g``'s one-hot class, plus
   ``iou_weight * -log(IoU(pred_a, g))``, plus a large constant when ``a`` is not both
   inside ``g`` and inside ``g``'s centre region.
3. Dynamic k: ``g`` takes its ``k`` lowest-cost anchors, where ``k`` is the sum of its
   ``num_top_ious`` largest candidate IoUs, truncated and at least 1.
4. An anchor claimed by several ground truths keeps the one with the lowest cost.

Everything is computed densely on ``(batch, max_gt, anchors)`` tensors with padded
ground truths masked out, so there is no Python loop over anchors or images and no
host-device synchronisation: the cost matrix is small next to the network.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vistrain.op.box import box_iou

_LOG_FLOOR = -100.0


class SimOTAResult(NamedTuple):
    """Assignment of anchor points to ground truths for a batch.

    Attributes:
        fg_mask: ``(B, A)`` bool, True for positive anchors.
        matched_gt: ``(B, A)`` long index of the assigned ground truth (meaningful where
            ``fg_mask``).
        matched_iou: ``(B, A)`` IoU of each anchor's prediction with its assigned box
            (meaningful where ``fg_mask``); the class target of the loss.
        dynamic_k: ``(B, G)`` long, the ``k`` of each ground truth (0 for padding).
        candidate_mask: ``(B, A)`` bool, anchors that passed the centre prior.
    """

    fg_mask: Tensor
    matched_gt: Tensor
    matched_iou: Tensor
    dynamic_k: Tensor
    candidate_mask: Tensor


class SimOTAAssigner:
    """Dense, batched SimOTA.

    Args:
        center_radius: Half side of the centre region, in strides of each anchor's level.
        iou_weight: Weight of the IoU cost against the classification cost.
        num_top_ious: How many of a ground truth's best IoUs are summed for its ``k``;
            this also caps ``k``.
        outside_center_cost: Cost added to pairs outside the box-and-centre region, so
            such anchors are used only when nothing better exists.
    """

    def __init__(
        self,
        center_radius: float = 2.5,
        iou_weight: float = 3.0,
        num_top_ious: int = 10,
        outside_center_cost: float = 1e5,
    ) -> None:
        if center_radius <= 0:
            raise ValueError(f"center_radius={center_radius} must be positive.")
        if num_top_ious < 1:
            raise ValueError(f"num_top_ious={num_top_ious} must be at least 1.")
        self.center_radius = center_radius
        self.iou_weight = iou_weight
        self.num_top_ious = num_top_ious
        self.outside_center_cost = outside_center_cost

    @torch.no_grad()
    def __call__(
        self,
        pred_boxes: Tensor,
        cls_logits: Tensor,
        obj_logits: Tensor,
        anchor_points: Tensor,
        anchor_strides: Tensor,
        gt_boxes: Tensor,
        gt_classes: Tensor,
        gt_valid: Tensor,
    ) -> SimOTAResult:
        """Assign anchors to ground truths.

        Args:
            pred_boxes: ``(B, A, 4)`` decoded xyxy predictions in input pixels.
            cls_logits: ``(B, A, C)`` class logits.
            obj_logits: ``(B, A)`` objectness logits.
            anchor_points: ``(A, 2)`` xy of each anchor point in input pixels.
            anchor_strides: ``(A,)`` stride of each anchor's level.
            gt_boxes: ``(B, G, 4)`` xyxy ground truths, padded.
            gt_classes: ``(B, G)`` long classes, padded.
            gt_valid: ``(B, G)`` bool, False for padding.

        Returns:
            The assignment (see ``SimOTAResult``).
        """
        pred_boxes = pred_boxes.float()
        gt_boxes = gt_boxes.float()
        num_anchors = anchor_points.shape[0]

        # 1. Centre prior, per (gt, anchor) pair: (B, G, A).
        px = anchor_points[:, 0].float().view(1, 1, -1)
        py = anchor_points[:, 1].float().view(1, 1, -1)
        x1, y1, x2, y2 = (gt_boxes[..., i : i + 1] for i in range(4))
        in_box = (px > x1) & (px < x2) & (py > y1) & (py < y2)
        radius = (self.center_radius * anchor_strides.float()).view(1, 1, -1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        in_center = ((px - cx).abs() < radius) & ((py - cy).abs() < radius)
        valid = gt_valid[..., None]
        candidate = ((in_box | in_center) & valid).any(dim=1)  # (B, A)
        pair_ok = candidate[:, None, :] & valid  # (B, G, A)

        # 2. Cost.
        ious = box_iou(gt_boxes, pred_boxes) * pair_ok  # (B, G, A)
        cost = self._class_cost(cls_logits, obj_logits, gt_classes)
        cost = cost + self.iou_weight * -torch.log(ious + 1e-8)
        cost = cost + self.outside_center_cost * (~(in_box & in_center)).float()
        cost = cost.masked_fill(~pair_ok, float("inf"))

        # 3. Dynamic k and the k cheapest anchors per ground truth.
        top = min(self.num_top_ious, num_anchors)
        top_ious = ious.topk(top, dim=-1).values
        dynamic_k = top_ious.sum(-1).long().clamp(min=1) * gt_valid
        cheapest_cost, cheapest_idx = cost.topk(top, dim=-1, largest=False)
        rank = torch.arange(top, device=cost.device)
        chosen = (rank < dynamic_k[..., None]) & torch.isfinite(cheapest_cost)
        matching = torch.zeros_like(pair_ok)
        matching.scatter_(-1, cheapest_idx, chosen)

        # 4. Conflicts: anchors claimed more than once go to their cheapest ground truth.
        claims = matching.sum(dim=1)  # (B, A)
        fg_mask = claims > 0
        first_claim = matching.byte().argmax(dim=1)
        cheapest_gt = cost.argmin(dim=1)
        matched_gt = torch.where(claims > 1, cheapest_gt, first_claim)
        matched_iou = ious.gather(1, matched_gt[:, None, :]).squeeze(1)
        return SimOTAResult(fg_mask, matched_gt, matched_iou, dynamic_k, candidate)

    @staticmethod
    def _class_cost(cls_logits: Tensor, obj_logits: Tensor, gt_classes: Tensor) -> Tensor:
        """Summed BCE of the joint score against each ground truth's one-hot class.

        ``sum_c BCE(p_c, onehot_c) = sum_c -log(1 - p_c) + log(1 - p_t) - log(p_t)`` for the
        target class ``t``, so the ``(B, G, A, C)`` tensor never has to exist.
        """
        joint = (cls_logits.float().sigmoid() * obj_logits.float().sigmoid()[..., None]).sqrt()
        log_p = torch.log(joint).clamp(min=_LOG_FLOOR)
        log_not_p = torch.log1p(-joint).clamp(min=_LOG_FLOOR)
        all_negative = -log_not_p.sum(-1)  # (B, A)
        num_gt = gt_classes.shape[1]
        index = gt_classes[:, :, None].expand(-1, -1, joint.shape[1])  # (B, G, A)
        log_p_t = log_p.transpose(1, 2).gather(1, index)
        log_not_p_t = log_not_p.transpose(1, 2).gather(1, index)
        return all_negative[:, None, :].expand(-1, num_gt, -1) + log_not_p_t - log_p_t
