"""YOLOX decoupled head, its anchor-free decoding and its training loss.

The head predicts, at every cell of every pyramid level, class logits, objectness and a
box as ``(dx, dy, log w, log h)`` in units of the level's stride: centre ``(cell + d) *
stride``, size ``exp(log w) * stride`` (anchor-free: one prediction per location, no anchor
boxes). The numerics follow official YOLOX (>= 0.2) so that its weights give its outputs.
``YOLOXHeadLoss`` assigns targets with SimOTA and scores the predictions;
``postprocess_detections`` turns head maps into per-image boxes for evaluation.

Wiring into a ``LossModule``::

    {"loss": YOLOXHeadLoss(num_classes),
     "connector": LossConnector({
         "cls_outs": pred_key("cls_score"), "reg_outs": pred_key("bbox_pred"),
         "obj_outs": pred_key("objectness"), "target_boxes": data_key("boxes2d"),
         "target_class_ids": data_key("boxes2d_classes"), "images_hw": data_key("input_hw")})}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vistrain.common.distributed import all_reduce_dict, is_distributed
from vistrain.op.box import aligned_box_giou, aligned_box_iou, batched_nms, box_cxcywh_to_xyxy
from vistrain.op.detect.csp_darknet import ConvBNAct, make_conv
from vistrain.op.detect.simota import SimOTAAssigner

MAX_LOG_SIZE = 15.0
"""Raw log-size predictions are clamped here before ``exp`` so a wild step cannot make inf."""


class YOLOXOut(NamedTuple):
    """Raw head maps, one tensor per level (strides ascending).

    Attributes:
        cls_score: ``(B, C, H, W)`` class logits.
        bbox_pred: ``(B, 4, H, W)`` box regression ``(dx, dy, log w, log h)`` in strides.
        objectness: ``(B, 1, H, W)`` objectness logits.
    """

    cls_score: list[Tensor]
    bbox_pred: list[Tensor]
    objectness: list[Tensor]


class DetOut(NamedTuple):
    """Detections, one tensor per image.

    Attributes:
        boxes: ``(N, 4)`` xyxy boxes in original-image pixels.
        scores: ``(N,)`` objectness times class probability.
        class_ids: ``(N,)`` long contiguous class indices.
    """

    boxes: list[Tensor]
    scores: list[Tensor]
    class_ids: list[Tensor]


class YOLOXHead(nn.Module):
    """Decoupled head: per level a 1x1 stem, then separate class and box branches.

    Args:
        num_classes: Number of object classes.
        in_channels: Channels of each input level.
        width: Width multiplier; the branches have ``int(256 * width)`` channels.
        depthwise: Depthwise-separable 3x3 convolutions (nano).
        prior_prob: Initial foreground probability of the class and objectness outputs,
            so early training is not swamped by the loss of the many negatives.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int],
        width: float,
        depthwise: bool = False,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        hidden = int(256 * width)
        self.num_classes = num_classes
        self.stems = nn.ModuleList(ConvBNAct(c, hidden, 1) for c in in_channels)
        self.cls_branches = nn.ModuleList(self._branch(hidden, depthwise) for _ in in_channels)
        self.reg_branches = nn.ModuleList(self._branch(hidden, depthwise) for _ in in_channels)
        self.cls_preds = nn.ModuleList(nn.Conv2d(hidden, num_classes, 1) for _ in in_channels)
        self.reg_preds = nn.ModuleList(nn.Conv2d(hidden, 4, 1) for _ in in_channels)
        self.obj_preds = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in in_channels)
        prior_bias = -math.log((1 - prior_prob) / prior_prob)
        for conv in (*self.cls_preds, *self.obj_preds):
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            nn.init.constant_(conv.bias, prior_bias)

    @staticmethod
    def _branch(channels: int, depthwise: bool) -> nn.Sequential:
        return nn.Sequential(
            make_conv(channels, channels, 3, depthwise=depthwise),
            make_conv(channels, channels, 3, depthwise=depthwise),
        )

    def forward(self, features: Sequence[Tensor]) -> YOLOXOut:
        """Return the raw maps of every level."""
        out = YOLOXOut([], [], [])
        for level, x in enumerate(features):
            x = self.stems[level](x)
            reg_feat = self.reg_branches[level](x)
            out.cls_score.append(self.cls_preds[level](self.cls_branches[level](x)))
            out.bbox_pred.append(self.reg_preds[level](reg_feat))
            out.objectness.append(self.obj_preds[level](reg_feat))
        return out


def anchor_grid(
    sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Grid cells of every level, in the order ``flatten_levels`` uses.

    Returns:
        ``(A, 2)`` xy cell indices (cell ``(i, j)`` is ``(j, i)``) and ``(A,)`` their strides.
        A prediction's box centre is ``(cell + (dx, dy)) * stride`` (see ``decode_boxes``).
    """
    cells, cell_strides = [], []
    for (h, w), stride in zip(sizes, strides):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32),
            torch.arange(w, device=device, dtype=torch.float32),
            indexing="ij",
        )
        cells.append(torch.stack((xs, ys), dim=-1).reshape(-1, 2))
        cell_strides.append(torch.full((h * w,), float(stride), device=device))
    return torch.cat(cells), torch.cat(cell_strides)


def cell_centres(grid: Tensor, strides: Tensor) -> Tensor:
    """Centres of the cells of ``anchor_grid`` in input pixels: ``(cell + 0.5) * stride``.

    SimOTA's centre prior measures distances from these points (as official YOLOX does),
    while the box decoding starts from the cell's corner.
    """
    return (grid + 0.5) * strides[:, None]


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """``[(B, C, H_l, W_l)]`` to ``(B, sum_l H_l W_l, C)``, levels then rows then columns."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def decode_cxcywh(reg: Tensor, grid: Tensor, strides: Tensor) -> Tensor:
    """Raw ``(..., A, 4)`` regression to ``(cx, cy, w, h)`` boxes in input pixels.

    As official YOLOX (>= 0.1) and the paper: centre ``(cell + (dx, dy)) * stride``, size
    ``exp((dw, dh)) * stride``, in that order of float operations so that official weights
    give official boxes to the last bit. Log sizes are clamped at ``MAX_LOG_SIZE`` first.
    """
    stride = strides[:, None]
    centre = (reg[..., :2] + grid) * stride
    size = reg[..., 2:].clamp(max=MAX_LOG_SIZE).exp() * stride
    return torch.cat((centre, size), dim=-1)


def decode_boxes(reg: Tensor, grid: Tensor, strides: Tensor) -> Tensor:
    """Raw ``(..., A, 4)`` regression to xyxy boxes (``centre -/+ size / 2``, as official)."""
    return box_cxcywh_to_xyxy(decode_cxcywh(reg, grid, strides))


def decode_predictions(outputs: YOLOXOut, strides: Sequence[int]) -> Tensor:
    """Head maps to official YOLOX's eval output: ``(B, A, 5 + C)`` before NMS.

    Each row is box centre x, y, width, height in input pixels, then objectness and the
    class probabilities after the sigmoid, anchors ordered levels, rows, columns (the
    layout official YOLOX's eval forward returns and its exported models emit).
    """
    _check_levels(outputs.cls_score, outputs.bbox_pred, outputs.objectness, len(strides))
    grid, grid_strides = anchor_grid(
        [(int(m.shape[-2]), int(m.shape[-1])) for m in outputs.cls_score],
        strides,
        outputs.cls_score[0].device,
    )
    return torch.cat(
        (
            decode_cxcywh(flatten_levels(outputs.bbox_pred).float(), grid, grid_strides),
            flatten_levels(outputs.objectness).float().sigmoid(),
            flatten_levels(outputs.cls_score).float().sigmoid(),
        ),
        dim=-1,
    )


def _check_levels(
    cls_outs: Sequence[Tensor], reg_outs: Sequence[Tensor], obj_outs: Sequence[Tensor], n: int
) -> None:
    if not (len(cls_outs) == len(reg_outs) == len(obj_outs) == n):
        raise ValueError(
            f"Got {len(cls_outs)} class, {len(reg_outs)} box and {len(obj_outs)} objectness "
            f"maps for {n} strides; pass one map of each per stride."
        )
    for level, (c, r, o) in enumerate(zip(cls_outs, reg_outs, obj_outs)):
        if r.shape[1] != 4 or o.shape[1] != 1 or not c.shape[-2:] == r.shape[-2:] == o.shape[-2:]:
            raise ValueError(
                f"Level {level}: class {tuple(c.shape)}, box {tuple(r.shape)}, objectness "
                f"{tuple(o.shape)}; expected (B, C, H, W), (B, 4, H, W), (B, 1, H, W)."
            )


def _hw_tensor(images_hw: Any, batch: int, device: torch.device, name: str) -> Tensor:
    """``images_hw`` (list of (h, w) or a (B, 2) tensor) as a float ``(B, 2)`` tensor."""
    if isinstance(images_hw, (list, tuple)) and images_hw and isinstance(images_hw[0], Tensor):
        hw = torch.stack([torch.as_tensor(x) for x in images_hw]).to(device, torch.float32)
    else:
        hw = torch.as_tensor(images_hw, dtype=torch.float32, device=device)
    if hw.shape != (batch, 2):
        raise ValueError(
            f"{name} has shape {tuple(hw.shape)}; expected one (h, w) pair per image "
            f"({batch} images)."
        )
    return hw


class YOLOXHeadLoss(nn.Module):
    """YOLOX training loss with SimOTA assignment.

    Terms (each summed over anchors and divided by the number of positive anchors of the
    batch, averaged over ranks so every rank scales its gradient alike):

    - ``loss_cls``: BCE of the class logits of positives against the one-hot class
      scaled by the IoU of the prediction with its box (IoU-aware targets);
    - ``loss_obj``: BCE of the objectness of every anchor against "is positive";
    - ``loss_bbox``: IoU loss of the decoded boxes of positives, times ``bbox_weight``;
    - ``loss_l1``: only once ``enable_l1_loss()`` was called (the paper turns it on for
      the last epochs, with the strong augmentation off): L1 between the raw regression
      and its targets (offset ``dx, dy`` and ``log(w / stride), log(h / stride)``).

    Args:
        num_classes: Number of classes.
        strides: Stride of each level, matching the order of the head maps.
        bbox_weight: Weight of the IoU term (5.0 in the paper's setting).
        cls_weight: Weight of the class term.
        obj_weight: Weight of the objectness term.
        l1_weight: Weight of the L1 term once enabled.
        iou_loss: ``"iou"`` (``1 - IoU^2``) or ``"giou"`` (``1 - GIoU``).
        assigner: The label assigner; a default ``SimOTAAssigner`` when None.

    Attributes:
        loss_l1: None while there is no L1 term; an elementwise L1 module once enabled.
        assigner: The assigner (replaceable, e.g. by a timing wrapper).
    """

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int] = (8, 16, 32),
        bbox_weight: float = 5.0,
        cls_weight: float = 1.0,
        obj_weight: float = 1.0,
        l1_weight: float = 1.0,
        iou_loss: str = "iou",
        assigner: SimOTAAssigner | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1.")
        if len(strides) == 0 or any(s <= 0 for s in strides):
            raise ValueError(f"strides={tuple(strides)} must be a non-empty list of positives.")
        if iou_loss not in ("iou", "giou"):
            raise ValueError(f"iou_loss={iou_loss!r} is not supported; use 'iou' or 'giou'.")
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.bbox_weight = bbox_weight
        self.cls_weight = cls_weight
        self.obj_weight = obj_weight
        self.l1_weight = l1_weight
        self.iou_loss = iou_loss
        self.assigner = assigner if assigner is not None else SimOTAAssigner()
        self.loss_l1: nn.Module | None = None

    def enable_l1_loss(self) -> None:
        """Turn the L1 term on (idempotent); called by the YOLOX mode-switch callback."""
        if self.loss_l1 is None:
            self.loss_l1 = nn.L1Loss(reduction="none")

    def _pad_targets(
        self,
        target_boxes: Sequence[Tensor],
        target_class_ids: Sequence[Tensor],
        batch: int,
        device: torch.device,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Stack per-image targets into ``(B, G, 4)``, ``(B, G)``, ``(B, G)`` valid mask.

        Boxes are taken as given, as official YOLOX does: a box reaching past the image
        content is not clipped (the augmentations already clip what they move). Only boxes
        without area are left out, since no prediction can overlap them.
        """
        if len(target_boxes) != batch or len(target_class_ids) != batch:
            raise ValueError(
                f"Got {len(target_boxes)} box lists and {len(target_class_ids)} class lists "
                f"for a batch of {batch} images; pass one (possibly empty) entry per image."
            )
        counts = []
        for i, (boxes, classes) in enumerate(zip(target_boxes, target_class_ids)):
            if not isinstance(boxes, Tensor) or not isinstance(classes, Tensor):
                raise TypeError(
                    f"Image {i}: boxes and class ids must be tensors, got "
                    f"{type(boxes).__name__} and {type(classes).__name__}."
                )
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or classes.shape != boxes.shape[:1]:
                raise ValueError(
                    f"Image {i}: boxes {tuple(boxes.shape)} and classes {tuple(classes.shape)}; "
                    "expected (N, 4) xyxy boxes and (N,) class ids."
                )
            counts.append(boxes.shape[0])
        num_gt = max(max(counts), 1)
        gt_boxes = torch.zeros(batch, num_gt, 4, device=device)
        gt_classes = torch.zeros(batch, num_gt, dtype=torch.long, device=device)
        for i, (boxes, classes) in enumerate(zip(target_boxes, target_class_ids)):
            gt_boxes[i, : counts[i]] = boxes.to(device=device, dtype=torch.float32)
            gt_classes[i, : counts[i]] = classes.to(device=device, dtype=torch.long)
        present = (
            torch.arange(num_gt, device=device)[None, :]
            < torch.tensor(counts, device=device)[:, None]
        )
        wh = gt_boxes[..., 2:] - gt_boxes[..., :2]
        valid = present & (wh > 0).all(-1)
        return gt_boxes, gt_classes, valid

    def forward(
        self,
        cls_outs: Sequence[Tensor],
        reg_outs: Sequence[Tensor],
        obj_outs: Sequence[Tensor],
        target_boxes: Sequence[Tensor],
        target_class_ids: Sequence[Tensor],
        images_hw: Any,
    ) -> dict[str, Tensor]:
        """Compute the loss terms.

        Args:
            cls_outs: Per level ``(B, C, H, W)`` class logits.
            reg_outs: Per level ``(B, 4, H, W)`` raw box regression.
            obj_outs: Per level ``(B, 1, H, W)`` objectness logits.
            target_boxes: Per image ``(N, 4)`` xyxy boxes in input pixels (N may be 0).
            target_class_ids: Per image ``(N,)`` class indices in ``[0, num_classes)``.
            images_hw: Per image ``(h, w)`` of the content before padding. Not used: the
                loss takes the boxes as given, as official YOLOX does (kept so that the
                call and its wiring stay the same).

        Returns:
            ``{"loss_cls", "loss_obj", "loss_bbox"}`` and ``"loss_l1"`` when enabled, each a
            0-d tensor, already weighted.

        Raises:
            ValueError: If the maps or targets have inconsistent shapes.
        """
        _check_levels(cls_outs, reg_outs, obj_outs, len(self.strides))
        if cls_outs[0].shape[1] != self.num_classes:
            raise ValueError(
                f"Class maps have {cls_outs[0].shape[1]} channels but the loss was built for "
                f"num_classes={self.num_classes}."
            )
        batch = cls_outs[0].shape[0]
        device = cls_outs[0].device
        grid, strides = anchor_grid(
            [(int(m.shape[-2]), int(m.shape[-1])) for m in cls_outs], self.strides, device
        )
        cls_logits = flatten_levels(cls_outs).float()  # (B, A, C)
        reg_raw = flatten_levels(reg_outs).float()  # (B, A, 4)
        obj_logits = flatten_levels(obj_outs).float().squeeze(-1)  # (B, A)
        pred_boxes = decode_boxes(reg_raw, grid, strides)
        gt_boxes, gt_classes, gt_valid = self._pad_targets(
            target_boxes, target_class_ids, batch, device
        )

        assigned = self.assigner(
            pred_boxes.detach(),
            cls_logits.detach(),
            obj_logits.detach(),
            cell_centres(grid, strides),
            strides,
            gt_boxes,
            gt_classes,
            gt_valid,
        )
        fg = assigned.fg_mask
        fg_float = fg.float()
        num_fg = fg_float.sum()
        if is_distributed():
            num_fg = all_reduce_dict({"num_fg": num_fg}, "mean")["num_fg"]
        norm = num_fg.clamp(min=1.0)

        matched_boxes = gt_boxes.gather(1, assigned.matched_gt[..., None].expand(-1, -1, 4))
        matched_classes = gt_classes.gather(1, assigned.matched_gt)

        loss_obj = F.binary_cross_entropy_with_logits(obj_logits, fg_float, reduction="sum")

        cls_target = F.one_hot(matched_classes, self.num_classes).float()
        cls_target = cls_target * assigned.matched_iou[..., None]
        cls_bce = F.binary_cross_entropy_with_logits(cls_logits, cls_target, reduction="none")
        loss_cls = (cls_bce.sum(-1) * fg_float).sum()

        if self.iou_loss == "iou":
            box_loss = 1.0 - aligned_box_iou(pred_boxes, matched_boxes).pow(2)
        else:
            box_loss = 1.0 - aligned_box_giou(pred_boxes, matched_boxes)
        loss_bbox = (box_loss * fg_float).sum()

        losses = {
            "loss_cls": self.cls_weight * loss_cls / norm,
            "loss_obj": self.obj_weight * loss_obj / norm,
            "loss_bbox": self.bbox_weight * loss_bbox / norm,
        }
        if self.loss_l1 is not None:
            target = self._l1_targets(matched_boxes, grid, strides)
            l1 = self.loss_l1(reg_raw, target).sum(-1)
            losses["loss_l1"] = self.l1_weight * (l1 * fg_float).sum() / norm
        return losses

    @staticmethod
    def _l1_targets(boxes: Tensor, grid: Tensor, strides: Tensor) -> Tensor:
        """Raw regression that would decode exactly to ``boxes`` (xyxy) in each cell.

        ``centre / stride - cell`` and ``log(size / stride + 1e-8)``, official's formula.
        """
        stride = strides[:, None]
        centre = (boxes[..., :2] + boxes[..., 2:]) / 2
        size = boxes[..., 2:] - boxes[..., :2]
        return torch.cat((centre / stride - grid, torch.log(size / stride + 1e-8)), dim=-1)


@torch.no_grad()
def postprocess_detections(
    outputs: YOLOXOut,
    strides: Sequence[int],
    score_threshold: float,
    nms_threshold: float,
    max_detections: int | None,
    image_size: tuple[int, int],
    pre_nms_top_k: int | None = 1000,
    input_hw: Any = None,
    original_hw: Any = None,
) -> DetOut:
    """Decode head maps into per-image detections, as official YOLOX's ``postprocess``.

    Each anchor point proposes one box with its best class, scored ``objectness *
    class probability``. Boxes scoring at least ``score_threshold`` (at most
    ``pre_nms_top_k`` per image, the best ones) go through class-wise NMS; the best
    ``max_detections`` are kept and scaled to original pixels. Boxes are not clipped to
    the image (official YOLOX does not either); whoever draws or exports them clips.

    Args:
        outputs: Head maps.
        strides: Stride of each level.
        score_threshold: Minimum score.
        nms_threshold: IoU above which a lower-scoring box of the same class is dropped.
        max_detections: Maximum boxes per image; None keeps all.
        image_size: ``(H, W)`` of the padded network input.
        pre_nms_top_k: Bound on the boxes per image entering NMS (its cost is quadratic);
            None lets every box above the threshold in.
        input_hw: Per image ``(h, w)`` of the content before padding; the full input
            when None.
        original_hw: Per image ``(h, w)`` of the original image; boxes are scaled by
            ``original_hw / input_hw`` per axis. Input pixels when None.

    Returns:
        ``DetOut`` of per-image tensors, by descending score.
    """
    first = outputs.cls_score[0]
    batch, device = first.shape[0], first.device
    image_h, image_w = image_size
    predictions = decode_predictions(outputs, strides)
    boxes = box_cxcywh_to_xyxy(predictions[..., :4])
    class_prob, class_ids = predictions[..., 5:].max(-1)
    scores = predictions[..., 4] * class_prob

    if input_hw is None:
        in_hw = torch.tensor([[image_h, image_w]] * batch, dtype=torch.float32, device=device)
    else:
        in_hw = _hw_tensor(input_hw, batch, device, "input_hw")
    out_hw = in_hw if original_hw is None else _hw_tensor(original_hw, batch, device, "original_hw")
    scale = (out_hw / in_hw).flip(-1).repeat(1, 2)  # (B, 4): sx, sy, sx, sy
    rescale = input_hw is not None or original_hw is not None

    result = DetOut([], [], [])
    for i in range(batch):
        keep = (scores[i] >= score_threshold).nonzero().squeeze(1)
        if pre_nms_top_k is not None and keep.numel() > pre_nms_top_k:
            keep = keep[scores[i, keep].topk(pre_nms_top_k).indices]
        img_boxes, img_scores, img_classes = boxes[i, keep], scores[i, keep], class_ids[i, keep]
        kept = batched_nms(img_boxes, img_scores, img_classes, nms_threshold)
        if max_detections is not None:
            kept = kept[:max_detections]
        result.boxes.append(img_boxes[kept] * scale[i] if rescale else img_boxes[kept])
        result.scores.append(img_scores[kept])
        result.class_ids.append(img_classes[kept])
    return result
