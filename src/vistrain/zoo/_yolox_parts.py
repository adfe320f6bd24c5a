"""Helpers of the ``yolox_shapes`` experiment that are more than wiring.

The cache folder, the thread count, optimizer parameter groups and a box visualizer that
also draws training batches.

They live apart from the experiment module so that it reads as a plain list of choices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vistrain.op.detect.yolox import YOLOXOut, postprocess_detections
from vistrain.vis.image import BoundingBoxVisualizer

logger = logging.getLogger("vistrain")

CACHE_ENV = "VISTRAIN_CACHE"
"""Environment variable that overrides the folder of generated data sets."""

THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables through which a user chooses the number of torch threads."""


def shapes_cache_dir(cache_dir: str = "") -> Path:
    """Folder the generated shapes splits live in.

    ``cache_dir`` when given, else ``$VISTRAIN_CACHE`` when set, else
    ``~/.cache/vistrain/shapes``.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV, "")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "vistrain" / "shapes"


def configure_threads(num_threads: int, num_workers: int = 0) -> int:
    """Set torch's intra-op threads and return the number in use.

    ``num_threads > 0`` is used as given. ``0`` means "the cores this process may run on,
    minus one per data loader worker" (at least one), unless the user chose a number
    through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, which is then left alone. With several
    local ranks the cores are shared among them.

    Why leave cores to the workers: measured on a 2-core machine shared with other jobs,
    a YOLOX-nano step with 2 threads took 0.15 to 0.65 s (OpenMP threads waiting for each
    other whenever another process holds a core) and the mosaic pipeline 9 to 120 ms per
    sample; with 1 compute thread plus 1 loader worker the step took a steady 0.25 s and
    the data (about 10 ms per sample) was fully hidden behind it.
    """
    if num_threads > 0:
        torch.set_num_threads(num_threads)
        return num_threads
    if any(os.environ.get(name) for name in THREAD_ENVS):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, cores // local_procs - num_workers)
    torch.set_num_threads(threads)
    return threads


def sgd_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the parameters into a weight-decayed group and one without decay.

    Convolution and linear weights decay; normalisation weights and every bias do not
    (decaying them only pulls the scales of the normalised features towards zero).

    Returns:
        Two parameter groups for ``torch.optim`` (an empty one is left out).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, norm_types) or name == "bias" or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def fused_sgd_supported() -> bool:
    """Whether this torch has the fused SGD update for CPU tensors (torch >= 2.4).

    The fused update runs one kernel over every parameter tensor instead of a Python loop
    over them; YOLOX-nano has about 330 tensors, and on a 2-core CPU the looped update
    took 14 ms of a ~200 ms step, the fused one 1.4 ms, with the same arithmetic. Older
    torch versions refuse ``fused=True`` for CPU tensors (or do not know the argument).
    """
    probe = torch.zeros(1, requires_grad=True)
    try:
        torch.optim.SGD([probe], lr=0.1, momentum=0.9, nesterov=True, fused=True)
    except (TypeError, RuntimeError):
        return False
    return True


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
    ) -> None:
        """Draw detections (given, or decoded from raw head maps) if ``cur_iter`` is due.

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
        super().process(cur_iter, images, image_names, boxes, scores, class_ids)


__all__ = [
    "CACHE_ENV",
    "DetectionVisualizer",
    "configure_threads",
    "fused_sgd_supported",
    "images_to_uint8",
    "sgd_param_groups",
    "shapes_cache_dir",
]
