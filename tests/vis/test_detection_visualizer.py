"""DetectionVisualizer: raw YOLOX head maps of a training batch are decoded and drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vistrain.op.detect.yolox import YOLOXOut, postprocess_detections
from vistrain.vis import BoundingBoxVisualizer, DetectionVisualizer
from vistrain.vis.detection import images_to_uint8

STRIDES = (8, 16, 32)


def _head_maps(side: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Maps that are confident about one class-1 box at one cell of the finest level."""
    cls_score, bbox_pred, objectness = [], [], []
    for stride in STRIDES:
        cells = side // stride
        cls_score.append(torch.full((1, 3, cells, cells), -10.0))
        bbox_pred.append(torch.zeros(1, 4, cells, cells))
        objectness.append(torch.full((1, 1, cells, cells), -10.0))
    cls_score[0][0, 1, 3, 3] = 10.0
    objectness[0][0, 0, 3, 3] = 10.0
    bbox_pred[0][0, 2:, 3, 3] = 1.0  # a box of e * stride pixels
    return cls_score, bbox_pred, objectness


def test_training_maps_are_decoded_and_drawn_on_the_network_input() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64) * 255
    cls_score, bbox_pred, objectness = _head_maps(64)
    vis = DetectionVisualizer(strides=STRIDES, vis_freq=1, score_threshold=0.3)
    vis.process(
        5,
        images,
        ["a"],
        cls_score=cls_score,
        bbox_pred=bbox_pred,
        objectness=objectness,
    )
    ((name, picture),) = vis.drawn
    assert name == "step000005_a"

    det = postprocess_detections(
        YOLOXOut(cls_score, bbox_pred, objectness), STRIDES, 0.3, 0.65, 100, (64, 64)
    )
    assert det.boxes[0].shape[0] == 1 and int(det.class_ids[0][0]) == 1
    reference = BoundingBoxVisualizer(vis_freq=1, score_threshold=0.3)
    reference.process(5, images_to_uint8(images), ["a"], det.boxes, det.scores, det.class_ids)
    ((_, expected),) = reference.drawn
    assert np.array_equal(np.asarray(picture), np.asarray(expected))
    assert not np.array_equal(np.asarray(picture), images_to_uint8(images)[0])  # a box is drawn


def test_images_to_uint8_rounds_and_clamps() -> None:
    images = torch.tensor([[-3.0, 0.4, 254.6, 300.0]]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    (pixels,) = images_to_uint8(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 0, 255, 255]


def test_no_boxes_and_no_maps_is_a_clear_error() -> None:
    vis = DetectionVisualizer(vis_freq=1)
    with pytest.raises(ValueError, match="cls_score, bbox_pred"):
        vis.process(0, torch.zeros(1, 3, 32, 32), ["a"])
