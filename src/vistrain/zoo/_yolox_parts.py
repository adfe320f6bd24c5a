"""Building blocks of the YOLOX experiments (``yolox_shapes``, ``yolox_coco``).

The cache folder, the thread count, optimizer parameter groups, a box visualizer that
also draws training batches, and the wiring both experiments share: the loss module, the
data connectors and the callback list.

They live apart from the experiment modules so that those read as plain lists of choices.
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

from vistrain.common.distributed import is_rank_zero
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.callbacks.evaluator import EvaluatorCallback
from vistrain.engine.callbacks.logging import LoggingCallback
from vistrain.engine.callbacks.visualizer import VisualizerCallback
from vistrain.engine.callbacks.yolox_callbacks import (
    YOLOXModeSwitchCallback,
    YOLOXSyncNormCallback,
    YOLOXSyncRandomResizeCallback,
)
from vistrain.engine.connectors import (
    CallbackConnector,
    DataConnector,
    LossConnector,
    data_key,
    pred_key,
)
from vistrain.engine.loss_module import LossModule
from vistrain.eval.coco import COCODetectEvaluator
from vistrain.model.summary import summarize
from vistrain.model.weights import freeze_backbone as freeze_yolox_backbone
from vistrain.model.weights import freeze_batchnorm, load_init_weights
from vistrain.model.yolox import YOLOX
from vistrain.op.detect.yolox import YOLOXHeadLoss, YOLOXOut, postprocess_detections
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


def check_init_weights(init_weights: str) -> None:
    """Refuse an ``init_weights`` value that names no file (before anything is built).

    Raises:
        ValueError: If ``init_weights`` is set and is not a file.
    """
    if init_weights and not os.path.isfile(os.path.expanduser(init_weights)):
        raise ValueError(
            f"init_weights={init_weights!r} is not a file; pass a vistrain checkpoint or an "
            "official YOLOX checkpoint"
        )


def start_from_weights(
    net: YOLOX, init_weights: str, freeze_backbone: bool, freeze_bn: bool
) -> None:
    """Apply the ``init_weights``, ``freeze_backbone`` and ``freeze_bn`` keys to a new YOLOX.

    Weights only (``load_init_weights``: no optimizer state, no loop position; class
    predictors of another class count keep their initialisation and are logged); freezing
    comes after loading so that the loaded BatchNorm statistics are the ones kept.
    """
    if init_weights:
        load_init_weights(net, os.path.expanduser(init_weights))
    if freeze_backbone:
        freeze_yolox_backbone(net)
    if freeze_bn:
        freeze_batchnorm(net)


def log_yolox_summary(net: YOLOX, image_size: int) -> None:
    """Log the model's parameters and GFLOPs at the training input size (rank 0 only)."""
    if is_rank_zero():
        size = (image_size, image_size)
        logger.info("YOLOX-%s: %s.", net.size, summarize(net, size, forward=net.decoded))


def yolox_loss_module(num_classes: int, strides: Sequence[int] = (8, 16, 32)) -> LossModule:
    """YOLOX's head loss wired to the model's raw maps and the batch's boxes."""
    return LossModule(
        {
            "loss": YOLOXHeadLoss(num_classes, strides=tuple(strides)),
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
            "name": "det",
        }
    )


def yolox_data_connectors() -> tuple[DataConnector, DataConnector]:
    """Model inputs in training (images) and in testing (images and their sizes)."""
    return DataConnector({"images": "images"}), DataConnector(
        {"images": "images", "input_hw": "input_hw", "original_hw": "original_hw"}
    )


def square_sizes(low: int, high: int, start: int, stride: int = 32) -> list[tuple[int, int]]:
    """Multi-scale input sizes: the multiples of ``stride`` in ``[low, high]``, ``start`` last.

    ``YOLOXSyncRandomResizeCallback`` trains at the last entry until its first draw.
    """
    sizes = [(s, s) for s in range(low, high + 1, stride) if s != start]
    return [*sizes, (start, start)]


def yolox_callbacks(
    output_dir: str,
    annotation_file: str,
    class_names: list[str],
    *,
    switch_epoch: int,
    sizes: list[tuple[int, int]],
    resize_interval: int,
    seed: int,
    log_every: int,
    vis_every: int,
    checkpoint_period: int,
    max_to_keep: int = 3,
) -> list[Callback]:
    """The callbacks of a YOLOX run, in the order they must run.

    EMA first, so the EMA is updated right after the optimizer step and before anything
    saves or draws; the norm sync before the evaluator (its test-epoch hook averages
    statistics first); the checkpoint callback last, so it sees every other callback's
    state of the same step.

    Args:
        output_dir: The run folder (pictures, saved predictions, checkpoints).
        annotation_file: COCO JSON of the validation data (the evaluator's ground truth).
        class_names: Names by class index, for the pictures.
        switch_epoch: First epoch without mosaic/mixup and with the L1 term.
        sizes: Multi-scale training sizes; the last one is used until the first draw.
        resize_interval: Draw a new size every this many steps.
        seed: Seed of the size draws.
        log_every: Log averaged training metrics every this many batches.
        vis_every: Draw training detections every this many steps.
        checkpoint_period: Save a checkpoint every this many epochs.
        max_to_keep: Periodic checkpoints kept.
    """
    visualizer = DetectionVisualizer(
        vis_freq=vis_every, class_names=class_names, score_threshold=0.3, max_images=4
    )
    return [
        EMACallback(),
        YOLOXModeSwitchCallback(switch_epoch=switch_epoch),
        YOLOXSyncRandomResizeCallback(size_list=sizes, interval=resize_interval, seed=seed),
        YOLOXSyncNormCallback(),
        LoggingCallback(refresh_rate=log_every),
        VisualizerCallback(
            visualizer=visualizer,
            visualize_train=True,
            save_prefix=output_dir,
            train_connector=CallbackConnector(
                {
                    "images": data_key("images"),
                    "image_names": data_key("sample_names"),
                    "cls_score": pred_key("cls_score"),
                    "bbox_pred": pred_key("bbox_pred"),
                    "objectness": pred_key("objectness"),
                }
            ),
            test_connector=CallbackConnector(
                {
                    "images": data_key("original_images"),
                    "image_names": data_key("sample_names"),
                    "boxes": pred_key("boxes"),
                    "scores": pred_key("scores"),
                    "class_ids": pred_key("class_ids"),
                }
            ),
        ),
        EvaluatorCallback(
            evaluator=COCODetectEvaluator(annotation_file),
            save_predictions=True,
            save_prefix=os.path.join(output_dir, "eval"),
            test_connector=CallbackConnector(
                {
                    "coco_image_id": data_key("coco_image_id"),
                    "pred_boxes": pred_key("boxes"),
                    "pred_scores": pred_key("scores"),
                    "pred_classes": pred_key("class_ids"),
                }
            ),
        ),
        CheckpointCallback(
            save_prefix=output_dir,
            checkpoint_period=checkpoint_period,
            max_to_keep=max_to_keep,
            monitor="Det/AP",
            mode="max",
        ),
    ]


__all__ = [
    "CACHE_ENV",
    "DetectionVisualizer",
    "check_init_weights",
    "configure_threads",
    "images_to_uint8",
    "log_yolox_summary",
    "sgd_param_groups",
    "shapes_cache_dir",
    "square_sizes",
    "start_from_weights",
    "yolox_callbacks",
    "yolox_data_connectors",
    "yolox_loss_module",
]
