"""A small image classifier on generated stripe patterns; trains in seconds on a CPU.

Each class is a stripe orientation (0, 45, 90, 135 degrees) with a random phase,
frequency, tint and noise, so the task needs spatial features but no download.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from vistrain.common.cpu import configure_threads
from vistrain.data.loader import build_test_dataloader, build_train_dataloader
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.callbacks.evaluator import EvaluatorCallback
from vistrain.engine.callbacks.logging import LoggingCallback
from vistrain.engine.connectors import (
    CallbackConnector,
    DataConnector,
    LossConnector,
    data_key,
    pred_key,
)
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import warmup_cosine
from vistrain.eval.classification import ClassificationEvaluator
from vistrain.model.adapter import ModelEMAAdapter
from vistrain.zoo.base import Experiment
from vistrain.zoo.engine_params import EngineParams
from vistrain.zoo.monitoring import MonitoringParams

DESCRIPTION = "CNN classifier on generated stripe images (4 classes), top-1/top-5 accuracy"
NUM_CLASSES = 4

logger = logging.getLogger("vistrain")


@dataclass
class Params(EngineParams, MonitoringParams):
    """Parameters of the toy classifier (``--set KEY=VALUE``).

    The engine options (``precision``, ``accumulate_grad_batches``, ``gradient_clip_val``,
    ``gradient_clip_algorithm``, ``compile``, ``channels_last``) are ``EngineParams``'.

    ``num_threads`` is the number of torch threads, as in the YOLOX experiment: 0 = the
    cores minus one per loader worker, at least 1 (unless OMP_NUM_THREADS is set).
    """

    num_epochs: int = 4
    batch_size: int = 32
    image_size: int = 32
    num_train_images: int = 1024
    num_val_images: int = 256
    num_workers: int = 0
    seed: int = 0
    lr: float = 0.05
    checkpoint_period: int = 1
    val_every: int = 1
    log_every: int = 10
    ema: bool = True
    norm: str = "batch"
    num_threads: int = 0

    def validate(self) -> None:
        """Raise ValueError for values no run can use."""
        self.validate_engine_options()
        self.validate_monitoring()
        positive = (
            "num_epochs",
            "batch_size",
            "image_size",
            "num_train_images",
            "num_val_images",
            "checkpoint_period",
            "val_every",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.num_threads < 0:
            raise ValueError(f"num_threads={self.num_threads} must be >= 0 (0 = automatic)")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm={self.norm!r} must be 'batch' or 'group'")


class StripesDataset(Dataset[dict[str, Any]]):
    """Deterministic stripe images: ``images`` (3, S, S) in [0, 1], ``labels`` class index."""

    def __init__(self, num_images: int, image_size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, NUM_CLASSES, (num_images,), generator=gen)
        coords = torch.arange(image_size, dtype=torch.float32)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        angle = self.labels.float() * (math.pi / NUM_CLASSES)
        freq = 0.3 + 0.4 * torch.rand(num_images, generator=gen)
        phase = 2 * math.pi * torch.rand(num_images, generator=gen)
        proj = (
            xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
        )
        stripes = torch.sin(proj * freq[:, None, None] + phase[:, None, None])
        tint = 0.5 + 0.5 * torch.rand(num_images, 3, 1, 1, generator=gen)
        noise = 0.3 * torch.randn(num_images, 3, image_size, image_size, generator=gen)
        self.images = (0.5 + 0.4 * stripes[:, None] * tint + noise).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"images": self.images[idx], "labels": self.labels[idx]}


class SmallCNN(nn.Module):
    """Three conv blocks and a linear classifier.

    ``norm="group"`` makes a step independent of how the batch is split across processes,
    so N processes with batch B/N train exactly like one process with batch B.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 16, 32, 64]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(4, c_out),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Class logits of a batch of images."""
        return {"logits": self.head(self.features(images).mean(dim=(2, 3)))}


def build(params: Params, output_dir: str) -> Experiment:
    """Build the toy classification run."""
    threads = configure_threads(params.num_threads, params.num_workers)
    logger.info("Torch uses %d thread(s).", threads)
    train_set = StripesDataset(params.num_train_images, params.image_size, params.seed)
    val_set = StripesDataset(params.num_val_images, params.image_size, params.seed + 1)
    net = SmallCNN(norm=params.norm)
    model: nn.Module = ModelEMAAdapter(net, decay=0.95) if params.ema else net
    optimizer = torch.optim.SGD(net.parameters(), lr=params.lr, momentum=0.9, weight_decay=5e-4)
    # build_train_dataloader uses the same seeded permutation whatever the number of
    # processes, so one process with batch B sees the samples N processes see with B/N.
    train_loader = build_train_dataloader(
        train_set,
        params.batch_size,
        num_workers=params.num_workers,
        seed=params.seed,
        drop_last=False,
        collate_fn=default_collate,
    )
    scheduler = warmup_cosine(
        optimizer, warmup_steps=len(train_loader) // 2, num_epochs=params.num_epochs
    )
    loss_module = LossModule(
        {
            "loss": nn.CrossEntropyLoss(),
            "connector": LossConnector({"input": pred_key("logits"), "target": data_key("labels")}),
            "name": "ce",
        }
    )
    evaluator = ClassificationEvaluator(num_classes=NUM_CLASSES)
    callbacks = [
        LoggingCallback(refresh_rate=params.log_every),
        EvaluatorCallback(
            evaluator=evaluator,
            test_connector=CallbackConnector(
                {"logits": pred_key("logits"), "labels": data_key("labels")}
            ),
        ),
        CheckpointCallback(save_prefix=output_dir, checkpoint_period=params.checkpoint_period),
    ]
    if params.ema:
        callbacks.insert(0, EMACallback())
    callbacks += params.monitoring_callbacks(output_dir, monitor="Cls/top1", mode="max")
    return Experiment(
        model=model,
        loss_module=loss_module,
        optimizers=[optimizer],
        lr_schedulers=[scheduler],
        train_dataloader=train_loader,
        test_dataloader=build_test_dataloader(
            val_set, params.batch_size, num_workers=params.num_workers, collate_fn=default_collate
        ),
        train_data_connector=DataConnector({"images": "images"}),
        test_data_connector=DataConnector({"images": "images"}),
        callbacks=callbacks,
        trainer_kwargs={
            "num_epochs": params.num_epochs,
            "check_val_every_n_epoch": params.val_every,
            "log_every_n_steps": params.log_every,
            **params.engine_trainer_kwargs(),
            **params.monitoring_trainer_kwargs(),
        },
    )


__all__ = ["DESCRIPTION", "Params", "build"]
