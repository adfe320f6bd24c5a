"""The wiring both YOLOX experiments (``yolox_shapes``, ``yolox_coco``) share.

The loss module, the data connectors, the callback list, the multi-scale sizes, and starting
from given weights. Written once here so that the experiment modules read as plain lists of
choices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

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
from vistrain.engine.optim import LRSchedulerWrapper
from vistrain.eval.coco import COCODetectEvaluator
from vistrain.model.summary import summarize
from vistrain.model.weights import freeze_backbone as freeze_yolox_backbone
from vistrain.model.weights import freeze_batchnorm, load_init_weights
from vistrain.model.yolox import YOLOX
from vistrain.op.detect.yolox import YOLOXHeadLoss
from vistrain.vis.detection import DetectionVisualizer
from vistrain.zoo.base import Experiment

logger = logging.getLogger("vistrain")


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
                    "gt_boxes": data_key("boxes2d"),
                    "gt_class_ids": data_key("boxes2d_classes"),
                }
            ),
            test_connector=CallbackConnector(
                {
                    "images": data_key("original_images"),
                    "image_names": data_key("sample_names"),
                    "boxes": pred_key("boxes"),
                    "scores": pred_key("scores"),
                    "class_ids": pred_key("class_ids"),
                    "gt_boxes": data_key("boxes2d"),
                    "gt_class_ids": data_key("boxes2d_classes"),
                    "gt_hw": data_key("input_hw"),
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


def yolox_experiment(
    params: Any,
    model: nn.Module,
    num_classes: int,
    optimizer: Optimizer,
    scheduler: LRSchedulerWrapper,
    train_loader: DataLoader[Any],
    test_loader: DataLoader[Any],
    callbacks: list[Callback],
) -> Experiment:
    """The ``Experiment`` of a YOLOX run: its loss, connectors and trainer settings.

    ``params`` is a YOLOX experiment's ``Params`` (``num_epochs``, ``val_every``,
    ``log_every`` and the engine and monitoring keys of its mixins).
    """
    train_connector, test_connector = yolox_data_connectors()
    return Experiment(
        model=model,
        loss_module=yolox_loss_module(num_classes, YOLOX.strides),
        optimizers=[optimizer],
        lr_schedulers=[scheduler],
        train_dataloader=train_loader,
        test_dataloader=test_loader,
        train_data_connector=train_connector,
        test_data_connector=test_connector,
        callbacks=callbacks,
        trainer_kwargs={
            "num_epochs": params.num_epochs,
            "check_val_every_n_epoch": params.val_every,
            "log_every_n_steps": params.log_every,
            **params.engine_trainer_kwargs(),
            **params.monitoring_trainer_kwargs(),
        },
    )


__all__ = [
    "check_init_weights",
    "log_yolox_summary",
    "square_sizes",
    "start_from_weights",
    "yolox_callbacks",
    "yolox_data_connectors",
    "yolox_experiment",
    "yolox_loss_module",
]
