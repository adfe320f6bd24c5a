from __future__ import annotations

import pytest
import torch

from vistrain.op.box import (
    aligned_box_giou,
    aligned_box_iou,
    batched_nms,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    nms,
)


def test_conversions_by_hand_and_round_trip() -> None:
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 1.0, 3.0]])
    cxcywh = torch.tensor([[20.0, 40.0, 20.0, 40.0], [0.5, 1.5, 1.0, 3.0]])
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.equal(box_cxcywh_to_xyxy(cxcywh), xyxy)
    batch = torch.rand(2, 5, 4) * 50
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batch)), batch, atol=1e-5)


def test_iou_by_hand() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [4 / 16, 4 / 16, 0.0]])
    assert torch.allclose(box_iou(a, b), expected, atol=1e-6)
    assert torch.allclose(aligned_box_iou(a, b[:2]), torch.tensor([1 / 7, 4 / 16]), atol=1e-6)
    # Batched pairwise IoU broadcasts leading dims.
    assert box_iou(a[None].expand(3, -1, -1), b[None].expand(3, -1, -1)).shape == (3, 2, 3)
    # Degenerate boxes give 0, not NaN.
    zero = torch.zeros(1, 4)
    assert box_iou(zero, zero).item() == 0.0
    assert torch.equal(box_area(torch.tensor([[2.0, 2.0, 1.0, 5.0]])), torch.tensor([0.0]))


def test_giou_by_hand() -> None:
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b = torch.tensor([2.0, 0.0, 3.0, 1.0])
    # Disjoint: IoU 0, hull 3, union 2 -> GIoU = -1/3.
    assert aligned_box_giou(a, b).item() == pytest.approx(-1 / 3, abs=1e-6)
    assert aligned_box_giou(a, a).item() == pytest.approx(1.0, abs=1e-6)


def _py_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference_classwise_nms(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, thr: float
) -> list[int]:
    """Textbook greedy NMS, one class at a time, in plain Python."""
    box_list, score_list, class_list = boxes.tolist(), scores.tolist(), classes.tolist()
    kept: list[int] = []
    for i in sorted(range(len(score_list)), key=lambda j: -score_list[j]):
        if all(
            class_list[i] != class_list[j] or _py_iou(box_list[i], box_list[j]) <= thr for j in kept
        ):
            kept.append(i)
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_nms_matches_brute_force(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 150
    xy = torch.rand(n, 2, generator=gen) * 60
    wh = torch.rand(n, 2, generator=gen) * 30 + 5
    boxes = torch.cat((xy, xy + wh), dim=1)
    scores = torch.rand(n, generator=gen)
    classes = torch.randint(0, 3, (n,), generator=gen)
    for thr in (0.3, 0.65):
        got = batched_nms(boxes, scores, classes, thr).tolist()
        assert got == _reference_classwise_nms(boxes, scores, classes, thr)
        # Class-agnostic NMS is the one-class case.
        assert nms(boxes, scores, thr).tolist() == _reference_classwise_nms(
            boxes, scores, torch.zeros(n, dtype=torch.long), thr
        )


def test_nms_keeps_other_classes_and_chains() -> None:
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [2.0, 0.0, 12.0, 10.0], [0, 0, 10, 10]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # IoU(0, 1) = IoU(1, 2) = 90/110 > 0.7 but IoU(0, 2) = 80/120 < 0.7: box 1 goes, and
    # box 2 stays because only kept boxes suppress.
    assert nms(boxes[:3], scores[:3], 0.7).tolist() == [0, 2]
    classes = torch.tensor([0, 0, 0, 1])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 3]
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), 0.5).numel() == 0


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="last dimension must be 4"):
        box_iou(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms(torch.zeros(3, 4), torch.zeros(3), 1.5)
    with pytest.raises(ValueError, match="class_ids"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2), 0.5)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        box_xyxy_to_cxcywh([1, 2, 3, 4])  # type: ignore[arg-type]
