"""YOLOX detector (Ge et al., 2021): CSPDarknet backbone, PAFPN neck, decoupled head.

Where it sits in a run::

    model.train(); out = model(images)              # YOLOXOut: raw maps for YOLOXHeadLoss
    model.eval();  det = model(images, input_hw, original_hw)
                                                    # DetOut: boxes/scores/class_ids per image

``images`` are ``(B, 3, H, W)`` float RGB in 0..255 (padding value 114); the model
normalises them itself, so data pipelines stay in pixel units. ``H`` and ``W`` should be
multiples of 32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vistrain.op.detect.csp_darknet import CSPDarknet
from vistrain.op.detect.pafpn import PAFPN
from vistrain.op.detect.yolox import DetOut, YOLOXHead, YOLOXOut, postprocess_detections

__all__ = ["SIZES", "YOLOX", "DetOut", "YOLOXOut"]

SIZES: dict[str, tuple[float, float, bool]] = {
    "nano": (0.33, 0.25, True),
    "tiny": (0.33, 0.375, False),
    "s": (0.33, 0.50, False),
    "m": (0.67, 0.75, False),
    "l": (1.0, 1.0, False),
    "x": (1.33, 1.25, False),
}
"""Model family: size name to (depth multiplier, width multiplier, depthwise convolutions)."""

STRIDES = (8, 16, 32)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class YOLOX(nn.Module):
    """Anchor-free one-stage detector.

    Args:
        num_classes: Number of object classes.
        size: One of ``SIZES`` (``"nano"``: 0.91M parameters for 80 classes, ``"tiny"``: 5.06M).
        score_threshold: Minimum ``objectness * class probability`` of a detection (eval).
        nms_threshold: IoU threshold of the class-wise NMS (eval).
        max_detections: Detections kept per image (eval).
        pre_nms_top_k: Candidates per image entering NMS (eval).

    Raises:
        ValueError: For an unknown size or out-of-range thresholds.
    """

    strides = STRIDES
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        num_classes: int,
        size: str = "nano",
        score_threshold: float = 0.01,
        nms_threshold: float = 0.65,
        max_detections: int = 100,
        pre_nms_top_k: int = 1000,
    ) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"Unknown YOLOX size {size!r}; choose one of {sorted(SIZES)}.")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1.")
        if not 0.0 <= score_threshold <= 1.0 or not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(
                f"score_threshold={score_threshold} and nms_threshold={nms_threshold} must lie "
                "in [0, 1]."
            )
        if max_detections < 1 or pre_nms_top_k < 1:
            raise ValueError(
                f"max_detections={max_detections} and pre_nms_top_k={pre_nms_top_k} must be "
                "at least 1."
            )
        depth, width, depthwise = SIZES[size]
        self.num_classes = num_classes
        self.size = size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.pre_nms_top_k = pre_nms_top_k
        self.backbone = CSPDarknet(depth, width, depthwise)
        self.neck = PAFPN(self.backbone.out_channels, depth, depthwise)
        self.head = YOLOXHead(num_classes, self.neck.out_channels, width, depthwise)
        self.register_buffer(
            "pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False
        )

    def forward(
        self, images: Tensor, input_hw: Any = None, original_hw: Any = None
    ) -> YOLOXOut | DetOut:
        """Run the detector.

        Args:
            images: ``(B, 3, H, W)`` float RGB in 0..255.
            input_hw: Per image ``(h, w)`` of the resized content before padding (eval).
            original_hw: Per image ``(h, w)`` of the original image (eval).

        Returns:
            Training mode: ``YOLOXOut`` of raw per-level maps. Eval mode: ``DetOut`` with
            per-image xyxy boxes in original-image pixels (input pixels when
            ``input_hw``/``original_hw`` are None), scores and class ids.

        Raises:
            ValueError: If ``images`` is not a ``(B, 3, H, W)`` tensor with even sides.
        """
        if (
            images.dim() != 4
            or images.shape[1] != 3
            or images.shape[-1] % 2
            or images.shape[-2] % 2
        ):
            raise ValueError(
                f"images has shape {tuple(images.shape)}; expected (B, 3, H, W) with even H "
                "and W (multiples of 32 work best)."
            )
        mean = self.pixel_mean.to(images.dtype)
        std = self.pixel_std.to(images.dtype)
        features = self.neck(self.backbone((images - mean) / std))
        outputs: YOLOXOut = self.head(features)
        if self.training:
            return outputs
        return postprocess_detections(
            outputs,
            self.strides,
            self.score_threshold,
            self.nms_threshold,
            self.max_detections,
            (int(images.shape[-2]), int(images.shape[-1])),
            self.pre_nms_top_k,
            input_hw,
            original_hw,
        )
