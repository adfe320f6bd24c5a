from __future__ import annotations

import math

import pytest
import torch

from vistrain.model.yolox import YOLOX, DetOut, YOLOXOut
from vistrain.op.box import box_iou
from vistrain.op.detect.yolox import YOLOXHeadLoss, postprocess_detections


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("size", "paper_millions"), [("nano", 0.91), ("tiny", 5.06)])
def test_parameter_counts_match_the_paper(size: str, paper_millions: float) -> None:
    count = _num_params(YOLOX(80, size))
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.02


def test_nano_uses_depthwise_convolutions_and_tiny_does_not() -> None:
    def depthwise(model: torch.nn.Module) -> int:
        return sum(
            isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
            for m in model.modules()
        )

    assert depthwise(YOLOX(3, "nano")) > 0
    assert depthwise(YOLOX(3, "tiny")) == 0


def test_training_mode_returns_raw_maps_per_level() -> None:
    model = YOLOX(5, "nano").train()
    out = model(torch.full((2, 3, 96, 128), 114.0))
    assert isinstance(out, YOLOXOut)
    for level, stride in enumerate((8, 16, 32)):
        hw = (96 // stride, 128 // stride)
        assert out.cls_score[level].shape == (2, 5, *hw)
        assert out.bbox_pred[level].shape == (2, 4, *hw)
        assert out.objectness[level].shape == (2, 1, *hw)


def test_eval_boxes_are_scaled_to_original_pixels() -> None:
    torch.manual_seed(0)
    model = YOLOX(3, "nano", score_threshold=0.0, max_detections=50).eval()
    images = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        plain = model(images)
        scaled = model(images, input_hw=[(64, 96), (64, 96)], original_hw=[(128, 288), (32, 48)])
    assert isinstance(plain, DetOut) and isinstance(scaled, DetOut)
    factors = [torch.tensor([3.0, 2.0, 3.0, 2.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])]
    for i in range(2):
        assert plain.boxes[i].shape == (50, 4)
        assert torch.allclose(scaled.boxes[i], plain.boxes[i] * factors[i], atol=1e-4)
        assert torch.equal(scaled.class_ids[i], plain.class_ids[i])
        assert torch.equal(scaled.scores[i], plain.scores[i])
        assert torch.all(plain.scores[i][:-1] >= plain.scores[i][1:])
    # Content smaller than the padded input: boxes are scaled, not clipped (as official).
    with torch.no_grad():
        cropped = model(images, input_hw=[(32, 48), (64, 96)], original_hw=[(64, 96), (64, 96)])
    assert torch.allclose(cropped.boxes[0], plain.boxes[0] * 2, atol=1e-4)
    assert float(cropped.boxes[0][:, 2].max()) > 96.0


def test_no_caps_keep_every_box_above_the_threshold() -> None:
    torch.manual_seed(0)
    capped = YOLOX(3, "nano", score_threshold=0.0, nms_threshold=1.0).eval()
    uncapped = YOLOX(
        3, "nano", score_threshold=0.0, nms_threshold=1.0, max_detections=None, pre_nms_top_k=None
    ).eval()
    uncapped.load_state_dict(capped.state_dict())
    images = torch.rand(1, 3, 256, 256) * 255
    with torch.no_grad():
        assert len(capped(images).boxes[0]) == 100
        # 1344 anchor points, all scoring >= 0 and none suppressed at NMS threshold 1.
        assert len(uncapped(images).boxes[0]) == 32 * 32 + 16 * 16 + 8 * 8


def _one_hot_maps(num_classes: int = 2) -> YOLOXOut:
    """64x64 input maps where only three stride-8 cells fire."""
    out = YOLOXOut([], [], [])
    for stride in (8, 16, 32):
        n = 64 // stride
        out.cls_score.append(torch.full((1, num_classes, n, n), -20.0))
        out.bbox_pred.append(torch.zeros(1, 4, n, n))
        out.objectness.append(torch.full((1, 1, n, n), -20.0))
    cls, reg, obj = out.cls_score[0], out.bbox_pred[0], out.objectness[0]
    # Cell (row 2, col 3) with offset 0.5: centre (28, 20), 16 px wide (log 2 strides), 8 px
    # high, class 1.
    obj[0, 0, 2, 3] = 5.0
    cls[0, 1, 2, 3] = 5.0
    reg[0, :2, 2, 3] = 0.5
    reg[0, 2, 2, 3] = math.log(2.0)
    # Cell (2, 4), offset (0, 0.5): centre (32, 20), overlaps it: same class -> suppressed,
    # other class -> kept.
    obj[0, 0, 2, 4] = 4.0
    cls[0, 1, 2, 4] = 4.0
    reg[0, 1, 2, 4] = 0.5
    reg[0, 2, 2, 4] = math.log(2.0)
    # Cell (7, 7), offset 0.5: bottom-right corner, box 24 px, partly in the padding.
    obj[0, 0, 7, 7] = 3.0
    cls[0, 0, 7, 7] = 3.0
    reg[0, :2, 7, 7] = 0.5
    reg[0, 2:, 7, 7] = math.log(3.0)
    return out


def test_postprocess_decodes_thresholds_nms_and_scales_by_hand() -> None:
    maps = _one_hot_maps()
    det = postprocess_detections(
        maps, (8, 16, 32), 0.5, 0.3, 10, (64, 64), input_hw=[(48, 64)], original_hw=[(96, 32)]
    )
    sig = torch.sigmoid
    # The second cell (24, 16, 40, 24) is suppressed (IoU 0.6 > 0.3 with the first, same
    # class).
    assert det.class_ids[0].tolist() == [1, 0]
    assert det.scores[0][0].item() == pytest.approx(float(sig(torch.tensor(5.0)) ** 2))
    assert det.scores[0][1].item() == pytest.approx(float(sig(torch.tensor(3.0)) ** 2))
    # First box: input (20, 16, 36, 24) scaled by (x 0.5, y 2).
    assert det.boxes[0][0].tolist() == pytest.approx([10.0, 32.0, 18.0, 48.0])
    # Corner box: input (48, 48, 72, 72) scaled, not clipped to the content (as official).
    assert det.boxes[0][1].tolist() == pytest.approx([24.0, 96.0, 36.0, 144.0])
    # The threshold keeps scores equal to it (official compares with >=).
    at = postprocess_detections(maps, (8, 16, 32), float(det.scores[0][1]), 0.3, 10, (64, 64))
    assert at.class_ids[0].tolist() == [1, 0]

    maps.cls_score[0][0, 1, 2, 4] = -20.0
    maps.cls_score[0][0, 0, 2, 4] = 4.0
    det = postprocess_detections(maps, (8, 16, 32), 0.5, 0.3, 10, (64, 64))
    assert det.class_ids[0].tolist() == [1, 0, 0]  # other class: kept
    det = postprocess_detections(maps, (8, 16, 32), 0.5, 0.3, 2, (64, 64))
    assert len(det.boxes[0]) == 2  # max_detections


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="Unknown YOLOX size"):
        YOLOX(3, "huge")
    with pytest.raises(ValueError, match="score_threshold"):
        YOLOX(3, score_threshold=2.0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        YOLOX(3)(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="original_hw"):
        YOLOX(3).eval()(torch.zeros(1, 3, 64, 64), [(64, 64)], [(64, 64), (1, 1)])


def test_overfits_one_synthetic_image() -> None:
    torch.manual_seed(0)
    image = torch.full((1, 3, 128, 128), 114.0)
    image[0, :, 20:60, 30:90] = torch.tensor([230.0, 40.0, 40.0])[:, None, None]
    image[0, :, 80:120, 70:100] = 20.0
    boxes = [torch.tensor([[30.0, 20.0, 90.0, 60.0], [70.0, 80.0, 100.0, 120.0]])]
    classes = [torch.tensor([0, 1])]
    model = YOLOX(2, "nano").train()
    loss = YOLOXHeadLoss(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(60):
        out = model(image)
        terms = loss(out.cls_score, out.bbox_pred, out.objectness, boxes, classes, [(128, 128)])
        total = sum(terms.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(float(total.detach()))
    assert sum(history[-5:]) / 5 < 0.5 * history[0]
    with torch.no_grad():
        det = postprocess_detections(model(image), (8, 16, 32), 0.1, 0.65, 10, (128, 128))
    for g in range(2):
        same_class = det.class_ids[0] == classes[0][g]
        assert same_class.any()
        iou = box_iou(det.boxes[0][same_class], boxes[0][g : g + 1])
        assert float(iou.max()) > 0.5
