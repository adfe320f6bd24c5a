"""Detection pictures of training batches as well as of evaluation batches.

``DetectionVisualizer`` extends ``BoundingBoxVisualizer``: besides decoded detections it
takes the raw YOLOX head maps a model returns in training and decodes them itself, so the
same visualizer can sit in the training and the test hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vistrain.op.detect.yolox import YOLOXOut, postprocess_detections
from vistrain.vis.image import BoundingBoxVisualizer

__all__ = ["DetectionVisualizer", "images_to_uint8"]


def images_to_uint8(images: Tensor) -> list[np.ndarray]:
    """``(B, 3, H, W)`` float pixels in 0..255 to a list of ``H x W x 3`` uint8 arrays."""
    pixels = images.detach().float().clamp(0, 255).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


class DetectionVisualizer(BoundingBoxVisualizer):
    """``BoundingBoxVisualizer`` that also draws the detections of training batches.

    At test time it gets decoded detections and the original images, like its parent. In
    training the model returns raw head maps; given ``cls_score``, ``bbox_pred`` and
    ``objectness`` it decodes them (no gradient) and draws the boxes on the augmented
    network input, so the pictures show what the network sees and finds. Training
    pictures are named ``step<S>_<image>.png`` so that later ones do not overwrite them.

    Args:
        strides: Strides of the head levels (for decoding training maps).
        nms_threshold: NMS IoU threshold when decoding training maps.
        **kwargs: Passed to ``BoundingBoxVisualizer`` (``vis_freq``, ``class_names``,
            ``score_threshold``, ``max_images``, ``line_width``).
    """

    def __init__(
        self, strides: Sequence[int] = (8, 16, 32), nms_threshold: float = 0.65, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.strides = tuple(strides)
        self.nms_threshold = nms_threshold

    def process(  # type: ignore[override]
        self,
        cur_iter: int,
        images: Any,
        image_names: Sequence[Any],
        boxes: Sequence[Any] | None = None,
        scores: Sequence[Any] | None = None,
        class_ids: Sequence[Any] | None = None,
        cls_score: Sequence[Tensor] | None = None,
        bbox_pred: Sequence[Tensor] | None = None,
        objectness: Sequence[Tensor] | None = None,
        **ground_truth: Any,
    ) -> None:
        """Draw detections (given, or decoded from raw head maps) if ``cur_iter`` is due.

        ``ground_truth`` (``gt_boxes``, ``gt_class_ids``, ``gt_hw``) is drawn beside them.

        Raises:
            ValueError: If neither ``boxes`` nor all three head maps are given.
        """
        if not self.should_process(cur_iter):
            return
        if cls_score is not None and bbox_pred is not None and objectness is not None:
            if not isinstance(images, Tensor):
                raise ValueError("Raw head maps need the network input tensor as images.")
            with torch.no_grad():
                det = postprocess_detections(
                    YOLOXOut(list(cls_score), list(bbox_pred), list(objectness)),
                    self.strides,
                    self.score_threshold,
                    self.nms_threshold,
                    100,
                    (int(images.shape[-2]), int(images.shape[-1])),
                )
            boxes, scores, class_ids = det.boxes, det.scores, det.class_ids
            images = images_to_uint8(images)
            image_names = [f"step{cur_iter:06d}_{name}" for name in image_names]
        elif boxes is None:
            raise ValueError(
                "DetectionVisualizer needs boxes (decoded detections) or cls_score, bbox_pred "
                "and objectness (raw YOLOX head maps)."
            )
        super().process(cur_iter, images, image_names, boxes, scores, class_ids, **ground_truth)
