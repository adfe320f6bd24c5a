"""Official YOLOX checkpoints (Megvii's ``yolox`` package) in vistrain's YOLOX.

The two implementations have the same modules in the same order; only their names differ
(official ``backbone.backbone.dark3.1.conv1.conv.weight`` is vistrain's
``backbone.dark3.1.main.0.weight``). ``official_key`` derives each official name from the
vistrain module tree with one renaming table per block type, so every size and depthwise
variant is covered without a hand-written list of keys.

Official YOLOX >= 0.2 was trained on BGR 0..255 images without normalisation, 0.1.x on RGB
normalised with the ImageNet statistics; ``YOLOX.bgr_input`` carries that choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from vistrain.op.detect.csp_darknet import (
    ConvBNAct,
    CSPLayer,
    DepthwiseSeparableConv,
    SpatialPyramidPooling,
)
from vistrain.op.detect.pafpn import PAFPN
from vistrain.op.detect.yolox import YOLOXHead

_CHILD_NAMES: dict[type, dict[str, str]] = {
    ConvBNAct: {"0": "conv", "1": "bn"},
    DepthwiseSeparableConv: {"0": "dconv", "1": "pconv"},
    CSPLayer: {"main": "conv1", "bypass": "conv2", "blocks": "m", "fuse": "conv3"},
    SpatialPyramidPooling: {"reduce": "conv1", "fuse": "conv2"},
    PAFPN: {
        "reduce5": "lateral_conv0",
        "td4": "C3_p4",
        "reduce4": "reduce_conv1",
        "td3": "C3_p3",
        "down3": "bu_conv2",
        "bu4": "C3_n3",
        "down4": "bu_conv1",
        "bu5": "C3_n4",
    },
    YOLOXHead: {"cls_branches": "cls_convs", "reg_branches": "reg_convs"},
}
"""Per block type, vistrain child name to official child name (others are the same)."""

_TOP_NAMES = {"backbone": "backbone.backbone", "neck": "backbone", "head": "head"}
"""Official YOLOX nests the backbone inside its PAFPN module, named ``backbone``."""

CLASS_PREDICTOR_PREFIX = "head.cls_preds."
"""Vistrain (and official) prefix of the class predictors, the only class-count-shaped
tensors."""


def official_key(model: nn.Module, key: str) -> str:
    """The official name of the vistrain state-dict entry ``key`` of a YOLOX ``model``."""
    parts = key.split(".")
    out = [_TOP_NAMES.get(parts[0], parts[0])]
    module = getattr(model, parts[0], None)
    for part in parts[1:]:
        renames = _CHILD_NAMES.get(type(module), {}) if module is not None else {}
        out.append(renames.get(part, part))
        module = getattr(module, part, None) if isinstance(module, nn.Module) else None
    return ".".join(out)


def is_official_state_dict(state: Any) -> bool:
    """Whether ``state`` is a state dict with official YOLOX parameter names."""
    return isinstance(state, Mapping) and "backbone.backbone.stem.conv.conv.weight" in state


def official_num_classes(state: Mapping[str, Any]) -> int:
    """Number of classes of an official state dict (rows of its class predictor)."""
    weight = state.get("head.cls_preds.0.weight")
    if not isinstance(weight, Tensor):
        raise ValueError("Official YOLOX state dict has no 'head.cls_preds.0.weight' entry.")
    return int(weight.shape[0])


def convert_official_state_dict(
    model: nn.Module, official: Mapping[str, Any]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Official state dict to ``model``'s names.

    Returns:
        The converted entries (only those ``model`` has), the official names ``model`` has
        no entry for (unexpected) and ``model``'s names missing from ``official``.
        ``bgr_input`` is not a weight and is never reported missing.
    """
    converted: dict[str, Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for key in model.state_dict():
        if key == "bgr_input":
            continue
        name = official_key(model, key)
        if name in official:
            converted[key] = official[name]
            used.add(name)
        else:
            missing.append(key)
    unexpected = [k for k in official if k not in used]
    return converted, unexpected, missing


__all__ = [
    "CLASS_PREDICTOR_PREFIX",
    "convert_official_state_dict",
    "is_official_state_dict",
    "official_key",
    "official_num_classes",
]
