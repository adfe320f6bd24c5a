r"""YOLOX on any COCO-format detection data, with the official recipe of each model size.

Point it at the data::

    vistrain fit --config yolox_coco --set size=s \
        --set train_ann=DIR/train.json --set train_images=DIR/train \
        --set val_ann=DIR/val.json --set val_images=DIR/val

The classes and their names come from the annotation files (category ids need not be
contiguous; class ``i`` is the ``i``-th smallest id, and the evaluator and ``vistrain
predict`` map it back). Images may be JPEG or PNG, of any size and aspect ratio, and
images without boxes are kept (they teach the background).

Every default is official YOLOX's for the chosen size (Megvii-BaseDetection/YOLOX,
``yolox/exp/yolox_base.py`` and ``exps/default/yolox_{nano,tiny,s,m,l,x}.py``):

- SGD, momentum 0.9, Nesterov; learning rate 0.01 per 64 images, scaled to the batch
  summed over the processes; weight decay 5e-4 on convolution weights only (not on norms
  and biases);
- 300 epochs; 5 epochs of quadratic warm-up from 0, then a cosine per step down to 0.05 x
  the peak, reached 15 epochs before the end and held there (``yolox_warm_cos``);
- those last 15 epochs without mosaic and mixup, with the L1 box term and a validation
  every epoch (``YOLOXModeSwitchCallback``); before them a validation every 10 epochs;
- an EMA of the weights, decay 0.9998 ramped in with a time constant of 2000 steps;
- inputs of 416 pixels for nano and tiny, 640 for the others; multi-scale training with a
  new size every 10 steps from 320..640 (nano, tiny) or 640 +- 5 x 32 (the others);
- mosaic with probability 0.5 (nano) or 1.0, its affine zoom 0.5..1.5 (nano, tiny) or
  0.1..2.0, rotation up to 10 degrees, shear up to 2 degrees, translation up to 0.1;
  mixup (probability 1.0, zoom 0.5..1.5) for s, m, l and x only; HSV jitter always,
  horizontal flips with probability 0.5;
- evaluation at score threshold 0.01 and NMS IoU 0.65.

One deviation: official ``yolox_tiny.py`` sets ``input_scale`` instead of ``input_size``,
so its mosaic canvas stays at 640 pixels until the multi-scale draw changes it; here tiny
uses 416 like nano (the size its test setting and the paper give).

``None`` in a size-dependent key means "the official value for ``size``". Every value is
a ``--set`` key; ``vistrain configs`` lists them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from vistrain.common.cpu import configure_threads
from vistrain.common.distributed import get_world_size
from vistrain.data.datasets import COCODataset
from vistrain.data.loader import build_test_dataloader, build_train_dataloader
from vistrain.data.presets import yolox_test_pipe, yolox_train_pipe
from vistrain.engine.optim import sgd_param_groups, yolox_warm_cos
from vistrain.model.adapter import ModelExpEMAAdapter
from vistrain.model.yolox import SIZES, YOLOX
from vistrain.predict import DetectorInfo, info_from_annotations
from vistrain.zoo.base import Experiment
from vistrain.zoo.engine_params import EngineParams
from vistrain.zoo.monitoring import MonitoringParams
from vistrain.zoo.yolox_wiring import (
    check_init_weights,
    log_yolox_summary,
    square_sizes,
    start_from_weights,
    yolox_callbacks,
    yolox_experiment,
)

DESCRIPTION = "YOLOX (nano..x) on your COCO-format data with the official recipe per size"

logger = logging.getLogger("vistrain")

STRIDE = 32
"""Input sides must be multiples of the coarsest stride of the detector."""

SMALL_SIZES = ("nano", "tiny")
"""Sizes whose official recipe trains at 416 pixels with weaker augmentation."""


@dataclass(frozen=True)
class SizeRecipe:
    """The size-dependent part of the official recipe."""

    image_size: int
    multiscale_min: int
    multiscale_max: int
    mosaic_prob: float
    mosaic_scale: tuple[float, float]
    mixup_prob: float


def official_recipe(size: str) -> SizeRecipe:
    """The official exp file's size-dependent settings for ``size``.

    Raises:
        ValueError: If ``size`` is not a YOLOX size.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a YOLOX size; choose one of {', '.join(SIZES)}")
    if size in SMALL_SIZES:
        # exps/default/yolox_nano.py and yolox_tiny.py: random_size (10, 20), mosaic_scale
        # (0.5, 1.5), enable_mixup False; nano alone halves mosaic_prob.
        return SizeRecipe(416, 320, 640, 0.5 if size == "nano" else 1.0, (0.5, 1.5), 0.0)
    # yolox_base.py: input 640, multiscale_range 5, mosaic_scale (0.1, 2), mixup_prob 1.0.
    return SizeRecipe(640, 640 - 5 * STRIDE, 640 + 5 * STRIDE, 1.0, (0.1, 2.0), 1.0)


@dataclass
class Params(EngineParams, MonitoringParams):
    """Parameters of a YOLOX run on COCO-format data (``--set KEY=VALUE``).

    The engine options (``precision``, ``accumulate_grad_batches``, ``gradient_clip_val``,
    ``gradient_clip_algorithm``, ``compile``, ``channels_last``) are ``EngineParams``'.

    Attributes:
        train_ann: COCO instances JSON of the training data (required).
        train_images: Folder the training images' ``file_name`` are relative to (required).
        val_ann: COCO instances JSON of the validation data (required).
        val_images: Folder of the validation images (required).
        size: Model size: nano, tiny, s, m, l or x.
        num_epochs: Training epochs.
        no_aug_epochs: Last epochs without mosaic/mixup, with the L1 term, at the minimum
            learning rate.
        warmup_epochs: Epochs of quadratic learning-rate warm-up from 0.
        batch_size: Images per optimizer step and process.
        lr_per_64: Peak learning rate for a total batch of 64 images; the run uses
            ``lr_per_64 * batch_size * processes / 64``.
        min_lr_ratio: Final learning rate as a fraction of the peak one.
        momentum: SGD momentum (Nesterov).
        weight_decay: Weight decay of convolution weights (norms and biases get none).
        ema_decay: Final decay of the weight EMA.
        ema_warmup_steps: Time constant of the EMA decay ramp, in steps.
        image_size: Side of the square network input; None = 416 (nano, tiny) or 640.
        multiscale_min: Smallest multi-scale size; None = official (320 or image_size - 160).
        multiscale_max: Largest multi-scale size; None = official (640 or image_size + 160).
            Equal to ``multiscale_min`` and ``image_size`` turns multi-scale off.
        resize_interval: Draw a new multi-scale size every this many steps.
        mosaic_prob: Chance of a mosaic per sample; None = 0.5 (nano) or 1.0.
        mosaic_scale_min: Smallest zoom of the mosaic's affine; None = 0.5 (nano, tiny) or 0.1.
        mosaic_scale_max: Largest zoom of the mosaic's affine; None = 1.5 (nano, tiny) or 2.0.
        mixup_prob: Chance of mixup after a mosaic; None = 0 (nano, tiny) or 1.0.
        mixup_scale_min: Smallest zoom of the mixed-in image.
        mixup_scale_max: Largest zoom of the mixed-in image.
        degrees: Largest rotation of the affine, in degrees.
        translate: Largest shift of the affine, as a fraction of the side.
        shear: Largest shear of the affine, in degrees.
        hsv_prob: Chance of the HSV colour jitter per sample.
        flip_prob: Chance of a horizontal flip per sample.
        score_threshold: Smallest score of an evaluated detection.
        nms_threshold: IoU of the class-aware NMS.
        val_every: Validate every this many epochs before the switch (every epoch after).
        checkpoint_period: Save a checkpoint every this many epochs.
        log_every: Log averaged training metrics every this many batches.
        vis_every: Draw training detections every this many steps.
        num_workers: Data loader worker processes per process (0 loads in the main one).
        num_threads: Torch threads; 0 = the cores minus one per loader worker, at least 1.
        seed: Seed of the weights, the shuffling and the augmentations.
        init_weights: Start from these weights: a vistrain checkpoint (its trained
            weights) or an official YOLOX checkpoint of the same size, told apart by
            content; weights only (no optimizer state, epoch 0). Class predictors of another
            class count keep their initialisation. Empty = train from scratch.
        freeze_backbone: Freeze the CSPDarknet backbone (weights and BatchNorm statistics).
        freeze_bn: Freeze every BatchNorm layer (statistics and scale/shift).
    """

    train_ann: str = ""
    train_images: str = ""
    val_ann: str = ""
    val_images: str = ""
    size: str = "s"
    num_epochs: int = 300
    no_aug_epochs: int = 15
    warmup_epochs: int = 5
    batch_size: int = 8
    lr_per_64: float = 0.01
    min_lr_ratio: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    ema_decay: float = 0.9998
    ema_warmup_steps: int = 2000
    image_size: int | None = None
    multiscale_min: int | None = None
    multiscale_max: int | None = None
    resize_interval: int = 10
    mosaic_prob: float | None = None
    mosaic_scale_min: float | None = None
    mosaic_scale_max: float | None = None
    mixup_prob: float | None = None
    mixup_scale_min: float = 0.5
    mixup_scale_max: float = 1.5
    degrees: float = 10.0
    translate: float = 0.1
    shear: float = 2.0
    hsv_prob: float = 1.0
    flip_prob: float = 0.5
    score_threshold: float = 0.01
    nms_threshold: float = 0.65
    val_every: int = 10
    checkpoint_period: int = 1
    log_every: int = 10
    vis_every: int = 500
    num_workers: int = 4
    num_threads: int = 0
    seed: int = 0
    init_weights: str = ""
    freeze_backbone: bool = False
    freeze_bn: bool = False

    def recipe(self) -> SizeRecipe:
        """The size-dependent settings of this run: the keys set, else the official ones."""
        official = official_recipe(self.size)
        image_size = official.image_size if self.image_size is None else self.image_size
        if self.size not in SMALL_SIZES:  # official: multiscale_range 5 around the input
            official = dataclasses.replace(
                official,
                multiscale_min=image_size - 5 * STRIDE,
                multiscale_max=image_size + 5 * STRIDE,
            )

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SizeRecipe(
            image_size=image_size,
            multiscale_min=pick(self.multiscale_min, official.multiscale_min),
            multiscale_max=pick(self.multiscale_max, official.multiscale_max),
            mosaic_prob=pick(self.mosaic_prob, official.mosaic_prob),
            mosaic_scale=(
                pick(self.mosaic_scale_min, official.mosaic_scale[0]),
                pick(self.mosaic_scale_max, official.mosaic_scale[1]),
            ),
            mixup_prob=pick(self.mixup_prob, official.mixup_prob),
        )

    def validate(self) -> None:
        """Raise ValueError naming the first key whose value no run can use."""
        self.validate_engine_options()
        self.validate_monitoring()
        run = self.recipe()
        for name in ("train_ann", "train_images", "val_ann", "val_images"):
            if not getattr(self, name):
                raise ValueError(
                    f"{name} is not set; yolox_coco needs --set train_ann=FILE --set "
                    "train_images=DIR --set val_ann=FILE --set val_images=DIR"
                )
        positive = (
            "num_epochs",
            "batch_size",
            "ema_warmup_steps",
            "resize_interval",
            "val_every",
            "checkpoint_period",
            "log_every",
            "vis_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("no_aug_epochs", "warmup_epochs", "num_workers", "num_threads", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.warmup_epochs + self.no_aug_epochs > self.num_epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} + no_aug_epochs={self.no_aug_epochs} must "
                f"be <= num_epochs={self.num_epochs}"
            )
        for name in ("image_size", "multiscale_min", "multiscale_max"):
            value = getattr(run, name)
            if value < STRIDE or value % STRIDE:
                raise ValueError(f"{name}={value} must be a positive multiple of {STRIDE}")
        if not run.multiscale_min <= run.image_size <= run.multiscale_max:
            raise ValueError(
                f"multiscale_min={run.multiscale_min} <= image_size={run.image_size} <= "
                f"multiscale_max={run.multiscale_max} must hold"
            )
        scales = {
            "mosaic_scale": run.mosaic_scale,
            "mixup_scale": (self.mixup_scale_min, self.mixup_scale_max),
        }
        for name, (low, high) in scales.items():
            if not 0 < low <= high:
                raise ValueError(f"{name}_min={low} and {name}_max={high} need 0 < min <= max")
        if self.lr_per_64 <= 0:
            raise ValueError(f"lr_per_64={self.lr_per_64} must be > 0")
        unit = {
            "mosaic_prob": run.mosaic_prob,
            "mixup_prob": run.mixup_prob,
            "hsv_prob": self.hsv_prob,
            "flip_prob": self.flip_prob,
            "score_threshold": self.score_threshold,
            "nms_threshold": self.nms_threshold,
            "min_lr_ratio": self.min_lr_ratio,
            "translate": self.translate,
        }
        for name, value in unit.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{name}={value} must be in [0, 1]")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(
                f"momentum={self.momentum} must be in [0, 1) and weight_decay="
                f"{self.weight_decay} >= 0"
            )
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1)")
        if self.degrees < 0 or self.shear < 0:
            raise ValueError(f"degrees={self.degrees} and shear={self.shear} must be >= 0")
        check_init_weights(self.init_weights)


def _datasets(params: Params) -> tuple[COCODataset, COCODataset]:
    """Open both splits; they must name the same categories."""
    train = COCODataset(params.train_ann, params.train_images)
    val = COCODataset(params.val_ann, params.val_images)
    if train.category_ids != val.category_ids:
        raise ValueError(
            f"train_ann {params.train_ann!r} has category ids {train.category_ids} but val_ann "
            f"{params.val_ann!r} has {val.category_ids}; both files need the same categories"
        )
    if not train.category_ids:
        raise ValueError(f"train_ann {params.train_ann!r} lists no categories")
    return train, val


def build(params: Params, output_dir: str) -> Experiment:
    """Build a YOLOX run on the COCO-format data that ``params`` names."""
    recipe = params.recipe()
    threads = configure_threads(params.num_threads, params.num_workers)
    logger.info("Torch uses %d thread(s).", threads)
    train_set, val_set = _datasets(params)
    num_classes = len(train_set.category_ids)
    logger.info(
        "%d classes from %s: %s", num_classes, params.train_ann, ", ".join(train_set.class_names)
    )
    if params.batch_size > len(train_set):
        raise ValueError(
            f"batch_size={params.batch_size} must be <= the {len(train_set)} training images "
            "(the last incomplete batch is dropped)"
        )

    net = YOLOX(
        num_classes=num_classes,
        size=params.size,
        score_threshold=params.score_threshold,
        nms_threshold=params.nms_threshold,
    )
    val_set.check_num_classes(net.num_classes)
    start_from_weights(net, params.init_weights, params.freeze_backbone, params.freeze_bn)
    log_yolox_summary(net, recipe.image_size)
    model = ModelExpEMAAdapter(net, decay=params.ema_decay, warmup_steps=params.ema_warmup_steps)
    lr = params.lr_per_64 * params.batch_size * get_world_size() / 64
    optimizer = torch.optim.SGD(
        sgd_param_groups(net, params.weight_decay), lr=lr, momentum=params.momentum, nesterov=True
    )
    train_pipe = yolox_train_pipe(
        train_set,
        recipe.image_size,
        mosaic_prob=recipe.mosaic_prob,
        mosaic_scale=recipe.mosaic_scale,
        degrees=params.degrees,
        translate=params.translate,
        shear=params.shear,
        mixup_prob=recipe.mixup_prob,
        mixup_scale=(params.mixup_scale_min, params.mixup_scale_max),
        hsv_prob=params.hsv_prob,
        flip_prob=params.flip_prob,
    )
    train_loader = build_train_dataloader(
        train_pipe,
        batch_size=params.batch_size,
        num_workers=params.num_workers,
        seed=params.seed,
        persistent_workers=params.num_workers > 0,
    )
    test_loader = build_test_dataloader(
        yolox_test_pipe(val_set, recipe.image_size),
        batch_size=params.batch_size * 2,
        num_workers=params.num_workers,
    )
    steps_per_epoch = len(train_loader)
    scheduler = yolox_warm_cos(
        optimizer,
        warmup_steps=params.warmup_epochs * steps_per_epoch,
        total_steps=params.num_epochs * steps_per_epoch,
        flat_steps=params.no_aug_epochs * steps_per_epoch,
        min_lr_ratio=params.min_lr_ratio,
    )
    callbacks = yolox_callbacks(
        output_dir,
        val_set.annotation_file,
        list(train_set.class_names),
        switch_epoch=params.num_epochs - params.no_aug_epochs,
        sizes=square_sizes(recipe.multiscale_min, recipe.multiscale_max, recipe.image_size, STRIDE),
        resize_interval=params.resize_interval,
        seed=params.seed,
        log_every=params.log_every,
        vis_every=params.vis_every,
        checkpoint_period=params.checkpoint_period,
    ) + params.monitoring_callbacks(output_dir, monitor="Det/AP", mode="max")
    return yolox_experiment(
        params, model, num_classes, optimizer, scheduler, train_loader, test_loader, callbacks
    )


def detector_info(params: Params) -> DetectorInfo:
    """Class names and ids of ``val_ann`` and the input size, for ``vistrain predict``."""
    info = info_from_annotations(params.val_ann)
    info.image_size = params.recipe().image_size
    return info


__all__ = ["DESCRIPTION", "Params", "SizeRecipe", "build", "detector_info", "official_recipe"]
