"""YOLOX detector (Ge et al., 2021): CSPDarknet backbone, PAFPN neck, decoupled head.

Where it sits in a run::

    model.train(); out = model(images)              # YOLOXOut: raw maps for YOLOXHeadLoss
    model.eval();  det = model(images, input_hw, original_hw)
                                                    # DetOut: boxes/scores/class_ids per image

``images`` are ``(B, 3, H, W)`` float RGB in 0..255 (padding value 114); the model
normalises them itself, so data pipelines stay in pixel units. ``H`` and ``W`` should be
multiples of 32.

Input conventions: vistrain's own models (and official YOLOX 0.1.x) scale RGB to 0..1 and
normalise with the ImageNet mean and std; official YOLOX >= 0.2 feeds BGR 0..255 as is.
``bgr_input=True`` selects the latter, so that official weights see what they were trained
on while the caller still passes RGB. The choice is a buffer of the state dict, so a model
fine-tuned from official weights keeps it in its checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vistrain.op.detect.csp_darknet import CSPDarknet
from vistrain.op.detect.pafpn import PAFPN
from vistrain.op.detect.yolox import (
    DetOut,
    YOLOXHead,
    YOLOXOut,
    decode_predictions,
    postprocess_detections,
)

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
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
"""ImageNet RGB statistics of 0..1 images (official YOLOX 0.1.x normalises with them too)."""


class YOLOX(nn.Module):
    """Anchor-free one-stage detector.

    Args:
        num_classes: Number of object classes.
        size: One of ``SIZES`` (``"nano"``: 0.91M parameters for 80 classes, ``"tiny"``: 5.06M).
        score_threshold: Minimum ``objectness * class probability`` of a detection (eval).
        nms_threshold: IoU threshold of the class-wise NMS (eval).
        max_detections: Detections kept per image (eval); None keeps all, as official.
        pre_nms_top_k: Candidates per image entering NMS (eval); None lets all in, as
            official.
        bgr_input: Feed the network BGR 0..255 without normalisation (official YOLOX >=
            0.2 weights) instead of normalised RGB. The caller passes RGB either way.

    Raises:
        ValueError: For an unknown size or out-of-range thresholds.
    """

    strides = STRIDES
    pixel_mean: Tensor
    pixel_std: Tensor
    bgr_input: Tensor

    def __init__(
        self,
        num_classes: int,
        size: str = "nano",
        score_threshold: float = 0.01,
        nms_threshold: float = 0.65,
        max_detections: int | None = 100,
        pre_nms_top_k: int | None = 1000,
        bgr_input: bool = False,
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
        if (max_detections is not None and max_detections < 1) or (
            pre_nms_top_k is not None and pre_nms_top_k < 1
        ):
            raise ValueError(
                f"max_detections={max_detections} and pre_nms_top_k={pre_nms_top_k} must be "
                "at least 1 (or None for no cap)."
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
        self.register_buffer("bgr_input", torch.tensor(bool(bgr_input)))

    def decoded(self, images: Tensor) -> Tensor:
        """Decoded predictions before NMS, in official YOLOX's eval layout.

        Args:
            images: ``(B, 3, H, W)`` float RGB in 0..255.

        Returns:
            ``(B, A, 5 + C)``: centre x, y, width, height in input pixels, objectness and
            class probabilities, for every anchor point (see ``decode_predictions``).
        """
        self._check_images(images)
        outputs: YOLOXOut = self.head(self.neck(self.backbone(self.normalize(images))))
        return decode_predictions(outputs, self.strides)

    @classmethod
    def from_official(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        size: str,
        num_classes: int | None = None,
        legacy: bool = False,
        **kwargs: Any,
    ) -> YOLOX:
        """Build a YOLOX from an official (Megvii ``yolox``) checkpoint.

        The returned model takes vistrain's usual input (RGB floats 0..255) and gives the
        official model's output for the same picture: it feeds the network BGR 0..255
        (official >= 0.2) or, with ``legacy``, RGB normalised with the ImageNet statistics
        (official 0.1.x).

        Args:
            checkpoint: The ``.pth`` file official training writes, its loaded dict
                (``{"model": state_dict, ...}``) or the bare state dict.
            size: The model size the checkpoint is of (one of ``SIZES``).
            num_classes: Classes of the new model; None takes the checkpoint's. Another
                count leaves the class predictors at their initialisation (fine-tuning).
            legacy: The checkpoint is from YOLOX 0.1.x.
            **kwargs: Other ``YOLOX`` arguments (thresholds, detection caps).

        Raises:
            FileNotFoundError: If the file does not exist.
            ValueError: If it is not an official checkpoint or not of ``size``.
        """
        from vistrain.model.weights import load_init_weights, read_weights_file
        from vistrain.model.yolox_official import is_official_state_dict, official_num_classes

        loaded = (
            read_weights_file(checkpoint)
            if isinstance(checkpoint, (str, os.PathLike))
            else checkpoint
        )
        state = loaded.get("model", loaded)
        if not is_official_state_dict(state):
            raise ValueError(
                "Not an official YOLOX checkpoint: no 'backbone.backbone.stem.conv.conv.weight' "
                "entry; pass the file official training writes, its dict or its 'model' entry."
            )
        classes = official_num_classes(state) if num_classes is None else num_classes
        model = cls(classes, size, bgr_input=not legacy, **kwargs)
        load_init_weights(model, state, legacy=legacy)
        return model

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load, reading checkpoints saved before ``bgr_input`` existed as normalised RGB."""
        state_dict.setdefault(prefix + "bgr_input", torch.tensor(False))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def normalize(self, images: Tensor) -> Tensor:
        """The network's input for RGB 0..255 ``images``, in the weights' convention.

        The operations run in the official order (flip; or divide by 255, subtract the
        mean, divide by the std), so official weights see bit-identical inputs. Both are
        computed and one is selected, which costs next to nothing against the network and
        reads the flag without a host-device synchronisation (and traces for export).
        """
        mean = self.pixel_mean.to(images.dtype)
        std = self.pixel_std.to(images.dtype)
        return torch.where(self.bgr_input, images.flip(1), (images / 255.0 - mean) / std)

    @staticmethod
    def _check_images(images: Tensor) -> None:
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
        self._check_images(images)
        features = self.neck(self.backbone(self.normalize(images)))
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
