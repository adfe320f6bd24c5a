from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from dist_utils import run_distributed
from vistrain.op.box import box_iou
from vistrain.op.detect.simota import SimOTAAssigner
from vistrain.op.detect.yolox import (
    YOLOXHeadLoss,
    anchor_grid,
    cell_centres,
    decode_boxes,
    flatten_levels,
)

STRIDES = (8, 16, 32)


def _maps(
    batch: int,
    size: int,
    num_classes: int,
    box_side: float = 4.0,
    cls_logit: float = 0.0,
    obj_logit: float = 0.0,
    requires_grad: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Head maps whose every anchor predicts a square of ``box_side`` strides on its cell.

    The offset 0.5 puts the box centre on the cell's centre (decoding starts at its corner).
    """
    cls, reg, obj = [], [], []
    for stride in STRIDES:
        n = size // stride
        r = torch.full((batch, 4, n, n), 0.5)
        r[:, 2:] = math.log(box_side)
        cls.append(torch.full((batch, num_classes, n, n), cls_logit))
        reg.append(r)
        obj.append(torch.full((batch, 1, n, n), obj_logit))
    if requires_grad:
        for t in (*cls, *reg, *obj):
            t.requires_grad_(True)
    return cls, reg, obj


def _assign(
    loss: YOLOXHeadLoss,
    cls: list[torch.Tensor],
    reg: list[torch.Tensor],
    obj: list[torch.Tensor],
    boxes: list[torch.Tensor],
    classes: list[torch.Tensor],
    hw: list[tuple[int, int]],
):  # type: ignore[no-untyped-def]
    """Run the loss's assigner exactly as the loss does, returning its result and anchors.

    The anchors are returned as cell centres in pixels (the points of the centre prior).
    """
    sizes = [(m.shape[-2], m.shape[-1]) for m in cls]
    grid, strides = anchor_grid(sizes, STRIDES, torch.device("cpu"))
    points = cell_centres(grid, strides)
    reg_flat = flatten_levels(reg)
    gt_boxes, gt_classes, valid = loss._pad_targets(boxes, classes, len(boxes), points.device)
    res = loss.assigner(
        decode_boxes(reg_flat, grid, strides).detach(),
        flatten_levels(cls).detach(),
        flatten_levels(obj).squeeze(-1).detach(),
        points,
        strides,
        gt_boxes,
        gt_classes,
        valid,
    )
    return res, points, strides


def test_decoding_is_official_cell_corner_plus_offset_times_stride() -> None:
    grid, strides = anchor_grid([(2, 3), (1, 2)], (8, 16), torch.device("cpu"))
    assert grid.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1], [0, 0], [1, 0]]
    assert strides.tolist() == [8.0] * 6 + [16.0] * 2
    assert cell_centres(grid, strides)[4].tolist() == [12.0, 12.0]
    reg = torch.zeros(8, 4)
    reg[4] = torch.tensor([0.25, -0.5, math.log(2.0), 0.0])  # cell (1, 1) of stride 8
    reg[7] = torch.tensor([0.0, 0.0, 0.0, math.log(3.0)])  # cell (1, 0) of stride 16
    boxes = decode_boxes(reg, grid, strides)
    # centre (1 + 0.25) * 8 = 10, (1 - 0.5) * 8 = 4; size 16 x 8.
    assert boxes[4].tolist() == pytest.approx([2.0, 0.0, 18.0, 8.0])
    # centre (16, 0), size 16 x 48: the raw offset 0 is the cell's corner, not its centre.
    assert boxes[7].tolist() == pytest.approx([8.0, -24.0, 24.0, 24.0])


def test_one_box_assigns_centred_anchors_of_the_matching_level() -> None:
    loss = YOLOXHeadLoss(num_classes=3)
    cls, reg, obj = _maps(1, 256, 3)
    # A 32 px box centred on the stride-8 anchor (14, 14) at (116, 116): anchors of that level
    # predict 32 px squares, so the centred one has IoU 1.
    boxes = [torch.tensor([[100.0, 100.0, 132.0, 132.0]])]
    classes = [torch.tensor([2])]
    res, points, strides = _assign(loss, cls, reg, obj, boxes, classes, [(256, 256)])
    fg = res.fg_mask[0]
    # IoUs of the level-8 anchors inside: 1 (centre), 0.6 x4 (edge), 0.39 x4 (corner), then
    # 0.25 at best elsewhere: k = int(1 + 2.4 + 1.56 + 0.25 + ...) = 5.
    assert res.dynamic_k[0, 0].item() == 5
    assert int(fg.sum()) == 5
    assert torch.all(strides[fg] == 8)
    p = points[fg]
    assert torch.all((p > 100) & (p < 132))
    centre = int(((points[:, 0] == 116) & (points[:, 1] == 116) & (strides == 8)).nonzero())
    assert fg[centre]
    assert res.matched_iou[0, centre].item() == pytest.approx(1.0, abs=1e-5)


def test_boxes_of_several_sizes_go_to_their_levels_inside_the_box() -> None:
    loss = YOLOXHeadLoss(num_classes=2)
    cls, reg, obj = _maps(1, 416, 2)
    boxes = torch.tensor(
        [
            [100.0, 100.0, 132.0, 132.0],  # 32 px, centre on a stride-8 anchor
            [168.0, 24.0, 232.0, 88.0],  # 64 px, centre on a stride-16 anchor
            [272.0, 272.0, 400.0, 400.0],  # 128 px, centre on a stride-32 anchor
        ]
    )
    res, points, strides = _assign(
        loss, cls, reg, obj, [boxes], [torch.tensor([0, 1, 0])], [(416, 416)]
    )
    fg, matched = res.fg_mask[0], res.matched_gt[0]
    for g, expected_stride in enumerate((8, 16, 32)):
        mine = fg & (matched == g)
        k = int(res.dynamic_k[0, g])
        assert k >= 1
        assert int(mine.sum()) == k
        assert torch.all(strides[mine] == expected_stride)
        p = points[mine]
        x1, y1, x2, y2 = boxes[g].tolist()
        assert torch.all((p[:, 0] > x1) & (p[:, 0] < x2) & (p[:, 1] > y1) & (p[:, 1] < y2))
        assert res.matched_iou[0, mine].max().item() == pytest.approx(1.0, abs=1e-5)


def test_no_box_gives_objectness_only() -> None:
    loss = YOLOXHeadLoss(num_classes=3)
    cls, reg, obj = _maps(2, 64, 3, obj_logit=-1.0, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = loss(cls, reg, obj, empty, [torch.zeros(0, dtype=torch.long)] * 2, [(64, 64)] * 2)
    assert set(out) == {"loss_cls", "loss_obj", "loss_bbox"}
    assert out["loss_cls"].item() == 0.0 and out["loss_bbox"].item() == 0.0
    # All anchors are negatives and the normaliser is clamped to 1.
    num_anchors = 2 * (64 + 16 + 4)
    assert out["loss_obj"].item() == pytest.approx(num_anchors * F.softplus(torch.tensor(-1.0)))
    sum(out.values()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (*cls, *reg, *obj))
    assert all(float(t.grad.abs().sum()) == 0.0 for t in (*cls, *reg))  # type: ignore[union-attr]
    assert all(float(t.grad.abs().sum()) > 0.0 for t in obj)  # type: ignore[union-attr]


def test_image_without_boxes_in_a_batch_has_no_positives() -> None:
    loss = YOLOXHeadLoss(num_classes=1)
    cls, reg, obj = _maps(2, 64, 1)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([0]), torch.zeros(0, dtype=torch.long)]
    res, _, _ = _assign(loss, cls, reg, obj, boxes, classes, [(64, 64)] * 2)
    assert res.fg_mask[0].any()
    assert not res.fg_mask[1].any()


def _reference_simota(
    pred_boxes: torch.Tensor,
    cls_logits: torch.Tensor,
    obj_logits: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    num_classes: int,
) -> tuple[list[bool], list[int]]:
    """SimOTA for one image written straight from the paper, with loops."""
    num_anchors, num_gt = points.shape[0], gt_boxes.shape[0]

    def in_box(g: int, a: int) -> bool:
        x, y = points[a].tolist()
        x1, y1, x2, y2 = gt_boxes[g].tolist()
        return x1 < x < x2 and y1 < y < y2

    def in_centre(g: int, a: int) -> bool:
        x, y = points[a].tolist()
        x1, y1, x2, y2 = gt_boxes[g].tolist()
        r = 2.5 * float(strides[a])
        return abs(x - (x1 + x2) / 2) < r and abs(y - (y1 + y2) / 2) < r

    cands = [
        a for a in range(num_anchors) if any(in_box(g, a) or in_centre(g, a) for g in range(num_gt))
    ]
    ious = box_iou(gt_boxes, pred_boxes[cands])
    joint = (cls_logits[cands].sigmoid() * obj_logits[cands, None].sigmoid()).sqrt()
    cost = torch.zeros(num_gt, len(cands))
    for g in range(num_gt):
        onehot = F.one_hot(gt_classes[g], num_classes).float().expand(len(cands), -1)
        cls_cost = F.binary_cross_entropy(joint, onehot, reduction="none").sum(-1)
        for j, a in enumerate(cands):
            cost[g, j] = cls_cost[j] + 3.0 * -math.log(float(ious[g, j]) + 1e-8)
            if not (in_box(g, a) and in_centre(g, a)):
                cost[g, j] += 1e5
    owners: dict[int, list[int]] = {}
    for g in range(num_gt):
        k = max(1, int(float(ious[g].topk(min(10, len(cands))).values.sum())))
        for j in cost[g].argsort()[:k].tolist():
            owners.setdefault(j, []).append(g)
    fg = [False] * num_anchors
    matched = [-1] * num_anchors
    for j, gs in owners.items():
        fg[cands[j]] = True
        matched[cands[j]] = gs[0] if len(gs) == 1 else int(cost[:, j].argmin())
    return fg, matched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_simota_matches_a_loop_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_classes, size, batch = 4, 64, 2
    cls, reg, obj = _maps(batch, size, num_classes)
    for level in range(3):
        cls[level] = torch.randn(cls[level].shape, generator=gen)
        obj[level] = torch.randn(obj[level].shape, generator=gen)
        reg[level][:, :2] = torch.rand(reg[level][:, :2].shape, generator=gen) * 2 - 0.5
        reg[level][:, 2:] = torch.rand(reg[level][:, 2:].shape, generator=gen) * 2
    boxes, classes = [], []
    for n in (4, 2):
        xy = torch.rand(n, 2, generator=gen) * 40
        wh = torch.rand(n, 2, generator=gen) * 30 + 6
        boxes.append(torch.cat((xy, (xy + wh).clamp(max=size)), dim=1))
        classes.append(torch.randint(0, num_classes, (n,), generator=gen))
    loss = YOLOXHeadLoss(num_classes)
    res, points, strides = _assign(loss, cls, reg, obj, boxes, classes, [(size, size)] * batch)
    pred = decode_boxes(flatten_levels(reg), points / strides[:, None] - 0.5, strides)
    for i in range(batch):
        fg, matched = _reference_simota(
            pred[i],
            flatten_levels(cls)[i],
            flatten_levels(obj)[i, :, 0],
            points,
            strides,
            boxes[i],
            classes[i],
            num_classes,
        )
        assert res.fg_mask[i].tolist() == fg
        got = torch.where(res.fg_mask[i], res.matched_gt[i], -1).tolist()
        assert got == matched


def test_losses_are_finite_normalised_and_have_finite_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    cls, reg, obj = _maps(2, 128, 5, requires_grad=False)
    cls = [torch.randn(t.shape, generator=gen).requires_grad_() for t in cls]
    reg = [(torch.randn(t.shape, generator=gen) * 0.5).requires_grad_() for t in reg]
    obj = [torch.randn(t.shape, generator=gen).requires_grad_() for t in obj]
    boxes = [
        torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 100.0]]),
        torch.tensor([[0.0, 0.0, 127.0, 127.0]]),
    ]
    classes = [torch.tensor([0, 4]), torch.tensor([2])]
    loss = YOLOXHeadLoss(5)
    out = loss(cls, reg, obj, boxes, classes, [(128, 128), (128, 128)])
    res, _, _ = _assign(loss, cls, reg, obj, boxes, classes, [(128, 128)] * 2)
    num_fg = float(res.fg_mask.sum())
    assert num_fg >= 3  # every box got at least one anchor
    obj_target = res.fg_mask.float()
    expected_obj = (
        F.binary_cross_entropy_with_logits(
            flatten_levels(obj).squeeze(-1), obj_target, reduction="sum"
        )
        / num_fg
    )
    assert out["loss_obj"].item() == pytest.approx(expected_obj.item(), rel=1e-5)
    total = sum(out.values())
    assert torch.isfinite(total)
    total.backward()
    for t in (*cls, *reg, *obj):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert any(float(t.grad.abs().sum()) > 0 for t in reg)  # type: ignore[union-attr]


def test_l1_term_appears_only_after_enable() -> None:
    loss = YOLOXHeadLoss(num_classes=1)
    cls, reg, obj = _maps(1, 64, 1)
    boxes = [torch.tensor([[12.0, 12.0, 44.0, 44.0]])]  # 32 px centred on a stride-8 anchor
    classes = [torch.tensor([0])]
    assert loss.loss_l1 is None
    assert "loss_l1" not in loss(cls, reg, obj, boxes, classes, [(64, 64)])
    loss.enable_l1_loss()
    first = loss.loss_l1
    loss.enable_l1_loss()
    assert first is not None and loss.loss_l1 is first
    out = loss(cls, reg, obj, boxes, classes, [(64, 64)])
    assert set(out) == {"loss_cls", "loss_obj", "loss_bbox", "loss_l1"}
    # Hand check: every anchor predicts its cell centre, (dx, dy) = 0.5, and log-size log 4
    # = the target's log(32 / 8), so the L1 error of a positive whose cell centre is (x, y)
    # is |x - 28| / s + |y - 28| / s.
    res, points, strides = _assign(loss, cls, reg, obj, boxes, classes, [(64, 64)])
    fg = res.fg_mask[0]
    err = ((points[fg] - 28.0).abs() / strides[fg, None]).sum()
    assert out["loss_l1"].item() == pytest.approx(float(err) / float(fg.sum()), rel=1e-5)
    assert out["loss_l1"].item() > 0


def test_boxes_are_taken_as_given_and_empty_ones_ignored() -> None:
    loss = YOLOXHeadLoss(num_classes=1)
    boxes = [torch.tensor([[10.0, 10.0, 90.0, 40.0], [70.0, 0.0, 70.0, 20.0]])]
    gt, _, valid = loss._pad_targets(boxes, [torch.tensor([0, 0])], 1, torch.device("cpu"))
    assert gt[0, 0].tolist() == [10.0, 10.0, 90.0, 40.0]  # not clipped, as official YOLOX
    assert valid[0].tolist() == [True, False]  # the second box has no width
    # The content size does not change the loss: nothing is clipped to it.
    cls, reg, obj = _maps(1, 96, 1)
    classes = [torch.tensor([0, 0])]
    small = loss(cls, reg, obj, boxes, classes, [(48, 64)])
    full = loss(cls, reg, obj, boxes, classes, [(96, 96)])
    assert all(torch.equal(small[k], full[k]) for k in full)


def test_bad_inputs_raise_clear_errors() -> None:
    loss = YOLOXHeadLoss(num_classes=2)
    cls, reg, obj = _maps(1, 64, 2)
    box, cl = [torch.zeros(1, 4)], [torch.zeros(1, dtype=torch.long)]
    with pytest.raises(ValueError, match="strides"):
        loss(cls[:2], reg[:2], obj[:2], box, cl, [(64, 64)])
    with pytest.raises(ValueError, match="num_classes=2"):
        loss(_maps(1, 64, 3)[0], reg, obj, box, cl, [(64, 64)])
    with pytest.raises(ValueError, match=r"one .* entry per image"):
        loss(cls, reg, obj, box * 2, cl, [(64, 64)])
    with pytest.raises(ValueError, match="iou_loss"):
        YOLOXHeadLoss(2, iou_loss="diou")
    with pytest.raises(ValueError, match="center_radius"):
        SimOTAAssigner(center_radius=0)


def _distributed_normaliser(rank: int, world_size: int) -> tuple[float, float, float]:
    loss = YOLOXHeadLoss(num_classes=1)
    cls, reg, obj = _maps(1, 64, 1)
    # Rank 0 has one box, rank 1 two: different local positive counts.
    all_boxes = torch.tensor([[12.0, 12.0, 44.0, 44.0], [40.0, 4.0, 60.0, 30.0]])
    boxes = [all_boxes[: rank + 1]]
    classes = [torch.zeros(rank + 1, dtype=torch.long)]
    out = loss(cls, reg, obj, boxes, classes, [(64, 64)])
    res, _, _ = _assign(loss, cls, reg, obj, boxes, classes, [(64, 64)])
    raw_obj = F.binary_cross_entropy_with_logits(
        flatten_levels(obj).squeeze(-1), res.fg_mask.float(), reduction="sum"
    )
    return float(out["loss_obj"]), float(raw_obj), float(res.fg_mask.sum())


def test_normaliser_is_the_positive_count_averaged_over_ranks() -> None:
    results = run_distributed(_distributed_normaliser, 2)
    counts = [r[2] for r in results]
    assert counts[0] != counts[1]
    mean = sum(counts) / 2
    for loss_obj, raw_obj, _ in results:
        assert loss_obj == pytest.approx(raw_obj / mean, rel=1e-5)


def test_documented_loss_module_wiring_and_l1_metric_name() -> None:
    from vistrain.engine.connectors import LossConnector, data_key, pred_key
    from vistrain.engine.loss_module import LossModule
    from vistrain.op.detect.yolox import YOLOXOut

    head_loss = YOLOXHeadLoss(num_classes=2)
    module = LossModule(
        {
            "loss": head_loss,
            "connector": LossConnector(
                {
                    "cls_outs": pred_key("cls_score"),
                    "reg_outs": pred_key("bbox_pred"),
                    "obj_outs": pred_key("objectness"),
                    "target_boxes": data_key("boxes2d"),
                    "target_class_ids": data_key("boxes2d_classes"),
                    "images_hw": data_key("input_hw"),
                }
            ),
        }
    )
    cls, reg, obj = _maps(1, 64, 2, requires_grad=True)
    outputs = YOLOXOut(cls, reg, obj)
    batch = {
        "boxes2d": [torch.tensor([[12.0, 12.0, 44.0, 44.0]])],
        "boxes2d_classes": [torch.tensor([1])],
        "input_hw": [torch.tensor([64, 64])],  # tensors work as well as tuples
    }
    total, metrics = module(outputs, batch)
    assert not any("l1" in k for k in metrics)
    head_loss.enable_l1_loss()
    total_l1, metrics = module(outputs, batch)
    l1_names = [k for k in metrics if "l1" in k]
    assert l1_names == ["YOLOXHeadLoss.loss_l1"]
    assert total_l1.item() == pytest.approx(total.item() + metrics[l1_names[0]].item(), rel=1e-5)
