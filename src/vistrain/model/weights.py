"""Starting a YOLOX from existing weights, and freezing parts of it.

``load_init_weights`` reads a vistrain checkpoint or an official YOLOX checkpoint (told
apart by their content) and copies its weights into a model: weights only, no optimizer
state and no loop position, so a run starts at epoch 0 from those weights. Fine-tuning on
a data set with another class count is the common case: the class predictors (the only
tensors whose shape depends on the class count) then keep their initialisation, and the
log lists them. Any other missing, unexpected or wrongly shaped tensor means the
checkpoint does not fit the model (another size, another architecture), which is an error
listing them, never a silent partial load.

``freeze_backbone`` and ``freeze_batchnorm`` stop parts of the model from changing:
parameters lose ``requires_grad`` and BatchNorm layers stay in eval mode (running
statistics fixed) even when ``model.train()`` is called later.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vistrain.engine.checkpoint_io import CHECKPOINT_FORMAT, _numpy_safe_globals
from vistrain.model.yolox_official import (
    CLASS_PREDICTOR_PREFIX,
    convert_official_state_dict,
    is_official_state_dict,
)

if TYPE_CHECKING:
    from vistrain.model.yolox import YOLOX

logger = logging.getLogger("vistrain")

_MAX_LISTED = 12
"""Names listed in an error before "and N more"."""

_INPUT_FLAG = "bgr_input"
"""The YOLOX buffer holding the input convention; set by the loader, never a weight."""


def read_weights_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """Load a checkpoint file with torch's restricted unpickler (no code from the file runs).

    Vistrain checkpoints and official YOLOX checkpoints hold only tensors, numbers,
    strings and containers, which that unpickler accepts.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the file is not a readable torch checkpoint holding a dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file {os.fspath(path)!r} does not exist; check the path.")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Cannot read weights file {os.fspath(path)!r} ({reason[:200]}); pass a vistrain "
            "checkpoint (.ckpt) or an official YOLOX checkpoint (.pth)."
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"Weights file {os.fspath(path)!r} holds a {type(obj).__name__}, not a checkpoint "
            "dict; pass a vistrain checkpoint or an official YOLOX checkpoint."
        )
    return obj


def _plain_model_weights(state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The trained model's own weights of a vistrain state dict, and where they came from.

    A model wrapped in an EMA adapter saves ``model.*`` (the weights the optimizer
    trained) and ``ema_model.*`` (their average); the plain ``model.*`` weights are the
    ones a new run continues from, as a resumed run would.
    """
    if any(k.startswith("ema_model.") for k in state):
        plain = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        return plain, "the plain model weights (model.*), not the EMA copy"
    return dict(state), "the model weights"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def load_init_weights(
    model: YOLOX, checkpoint: str | os.PathLike[str] | Mapping[str, Any], legacy: bool = False
) -> list[str]:
    """Copy the weights of a vistrain or official YOLOX checkpoint into ``model``.

    The kind is told by the content: a vistrain checkpoint has ``format ==
    "vistrain-checkpoint"`` (its plain ``model.*`` weights are used, not the EMA copy); an
    official one has official names (``{"model": state_dict}`` or a bare state dict). An
    official checkpoint also sets the model's input convention: BGR 0..255 for YOLOX >=
    0.2, or normalised RGB when ``legacy`` (0.1.x). A vistrain checkpoint carries its own.

    Args:
        model: The YOLOX to initialise (the bare model, before any EMA adapter wraps it).
        checkpoint: A file path, or an already loaded checkpoint or state dict.
        legacy: The official checkpoint is from YOLOX 0.1.x (normalised RGB input).

    Returns:
        The names of the tensors left at their initialisation (class predictors whose
        shape differs because the class count does); empty when everything was loaded.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the checkpoint is of neither kind, or does not fit the model apart
            from the class predictors (the message lists the offending tensors).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        where, obj = os.fspath(checkpoint), read_weights_file(checkpoint)
    else:
        where, obj = "<dict>", checkpoint
    if obj.get("format") == CHECKPOINT_FORMAT:
        source, which = _plain_model_weights(obj.get("state_dict") or {})
        kind = "vistrain checkpoint"
        bgr = source.pop(_INPUT_FLAG, None)
        unexpected: list[str] = []
    elif is_official_state_dict(obj.get("model", obj)):
        source, unexpected, _ = convert_official_state_dict(model, obj.get("model", obj))
        kind, which = "official YOLOX checkpoint", "its model weights"
        bgr = torch.tensor(not legacy)
    else:
        raise ValueError(
            f"{where} is neither a vistrain checkpoint (no format 'vistrain-checkpoint') nor "
            "an official YOLOX checkpoint (no 'backbone.backbone.stem.conv.conv.weight'); "
            "pass one of those."
        )

    target = model.state_dict()
    names = [k for k in target if k != _INPUT_FLAG]
    missing = [k for k in names if k not in source]
    unexpected += [k for k in source if k not in target]
    skipped, misshapen = [], []
    for key in names:
        value = source.get(key)
        if isinstance(value, Tensor) and value.shape != target[key].shape:
            if key.startswith(CLASS_PREDICTOR_PREFIX):
                skipped.append(key)
            else:
                misshapen.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
    problems = [
        f"{label}: {_listed(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape (checkpoint vs model)", misshapen),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"{kind} {where} does not fit this YOLOX-{model.size} with {model.num_classes} "
            f"classes (another model size?); " + "; ".join(problems)
        )
    weights = {k: source[k] for k in names if k not in skipped}
    weights[_INPUT_FLAG] = torch.as_tensor(bool(bgr) if bgr is not None else False)
    model.load_state_dict(weights, strict=False)
    convention = "BGR 0..255" if bool(weights[_INPUT_FLAG]) else "RGB normalised"
    logger.info(
        "init_weights: loaded %d tensors from %s %s (%s; no optimizer state, no loop "
        "position); model input %s.",
        len(weights) - 1,
        kind,
        where,
        which,
        convention,
    )
    if skipped:
        logger.info(
            "init_weights: the class count differs, left at initialisation: %s.",
            ", ".join(skipped),
        )
    return skipped


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode: ``train()`` never turns it back on.

    ``freeze_batchnorm`` switches existing layers to this class in place, so their weights,
    buffers and state-dict names stay exactly as they were.
    """

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        """Ignore ``mode``: the layer keeps its running statistics fixed."""
        return super().train(False)


def freeze_batchnorm(module: nn.Module) -> int:
    """Freeze every BatchNorm2d in ``module``: eval mode for good and no gradients.

    Their running statistics stop updating (the statistics of a small fine-tuning batch
    are noisier than those learnt on the pretraining data) and their scale and shift stop
    training. Layers stay frozen through later ``train()`` calls and deep copies (an EMA
    copy). Converting the model to SyncBatchNorm afterwards would undo it.

    Returns:
        The number of layers frozen.
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d) and not isinstance(layer, nn.SyncBatchNorm):
            layer.__class__ = FrozenBatchNorm2d
            layer.eval()
            layer.requires_grad_(False)
            count += 1
    return count


def freeze_backbone(model: YOLOX) -> int:
    """Freeze the CSPDarknet backbone: no gradients and BatchNorm statistics fixed.

    The PAFPN neck and the head keep training.

    Returns:
        The number of backbone parameters frozen.
    """
    params = list(model.backbone.parameters())
    for param in params:
        param.requires_grad_(False)
    freeze_batchnorm(model.backbone)
    return sum(p.numel() for p in params)


__all__ = [
    "FrozenBatchNorm2d",
    "freeze_backbone",
    "freeze_batchnorm",
    "load_init_weights",
    "read_weights_file",
]
