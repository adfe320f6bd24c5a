"""``vistrain fit --engine lightning``: run an experiment under ``lightning.pytorch.Trainer``.

The experiment is the same object the native engine trains; its callbacks run unchanged
through ``CallbackWrapper``. Lightning's own logger, checkpointing, progress bar, model
summary and sanity validation are off: the vistrain callbacks log, save and draw, so a run
writes the same outputs (``metrics.jsonl``, ``checkpoints/``, ``vis/``, ``eval/``).

Processes: one process uses the CPU or the first GPU. Under ``torchrun`` (``WORLD_SIZE`` > 1)
the process group ``vistrain.run`` created is reused: a ``DDPStrategy`` with Lightning's
``TorchElasticEnvironment`` reads rank, local rank and world size from the launcher's
environment, on one machine or several.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from vistrain.common.distributed import DEFAULT_TIMEOUT
from vistrain.engine.loop_state import check_loop_limits, check_trains_some_steps
from vistrain.pl.callback_wrapper import CallbackWrapper
from vistrain.pl.training_module import TrainingModule
from vistrain.zoo.base import Experiment

logger = logging.getLogger("vistrain")

_TRAINER_KEYS = {
    "max_time",
    "loggers",
    "num_epochs",
    "num_steps",
    "check_val_every_n_epoch",
    "val_check_interval",
    "log_every_n_steps",
    "tensorboard",
    "compile",
    "channels_last",
}
_STEP_KEYS = (
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
)
"""Native ``Trainer`` arguments that the ``TrainingModule`` takes (the engine steps)."""
_NEVER = 10**9
"""check_val_every_n_epoch standing for "never by epoch" (Lightning needs an int or None)."""


def _devices() -> dict[str, Any]:
    """Accelerator, devices, nodes and strategy from the environment (torchrun or none)."""
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return {"accelerator": accelerator, "devices": 1, "num_nodes": 1, "strategy": "auto"}
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if world_size % local_world:
        raise ValueError(
            f"WORLD_SIZE={world_size} is not a multiple of LOCAL_WORLD_SIZE={local_world}; "
            "start every machine with the same --nproc-per-node."
        )
    strategy = DDPStrategy(
        cluster_environment=TorchElasticEnvironment(),
        process_group_backend="nccl" if accelerator == "gpu" else "gloo",
        timeout=DEFAULT_TIMEOUT,
    )
    return {
        "accelerator": accelerator,
        "devices": local_world,
        "num_nodes": world_size // local_world,
        "strategy": strategy,
    }


def build_lightning_trainer(
    output_dir: str,
    num_epochs: int = 1000,
    num_steps: int = -1,
    num_optimizers: int = 1,
    check_val_every_n_epoch: int | None = 1,
    val_check_interval: int | None = None,
    callbacks: list[pl.Callback] | None = None,
    **overrides: Any,
) -> pl.Trainer:
    """A ``lightning.pytorch.Trainer`` set up like the native engine.

    Args:
        output_dir: Run folder (Lightning's ``default_root_dir``).
        num_epochs: Epoch limit (-1 = none).
        num_steps: Training-step limit (-1 = none); Lightning counts every optimizer's step,
            so its ``max_steps`` is ``num_steps * num_optimizers``.
        num_optimizers: Optimizers stepped per training step.
        check_val_every_n_epoch: Validate after every n-th epoch (None/0: never by epoch).
        val_check_interval: Validate every n training (optimizer) steps instead (Lightning
            validates either by epoch or by step; with this set, by step only). The
            ``TrainingModule``'s engine counts them in optimizer steps under accumulation
            too, as the native Trainer does.
        callbacks: Lightning callbacks (``CallbackWrapper`` objects).
        **overrides: Further ``Trainer`` arguments (e.g. ``strategy``, ``precision``); they
            replace the environment's choice.

    Raises:
        ValueError: For a limit or an interval out of range.
    """
    check_loop_limits(num_epochs, num_steps, check_val_every_n_epoch, val_check_interval)
    if val_check_interval is not None:
        val_kwargs: dict[str, Any] = {
            "check_val_every_n_epoch": None,
            "val_check_interval": val_check_interval,
        }
    else:
        val_kwargs = {"check_val_every_n_epoch": check_val_every_n_epoch or _NEVER}
    kwargs: dict[str, Any] = {
        **_devices(),
        "default_root_dir": output_dir,
        "max_epochs": num_epochs,
        "max_steps": -1 if num_steps == -1 else num_steps * num_optimizers,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "reload_dataloaders_every_n_epochs": 1,
        "use_distributed_sampler": False,
        "inference_mode": False,
        "callbacks": list(callbacks or []),
        **val_kwargs,
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def fit_with_lightning(
    experiment: Experiment, output_dir: str, ckpt_path: str | None = None
) -> TrainingModule:
    """Train ``experiment`` with Lightning, writing into ``output_dir``.

    Args:
        experiment: What ``build()`` of a vistrain experiment returns.
        output_dir: Run folder: ``metrics.jsonl``, ``checkpoints/``, pictures, predictions.
        ckpt_path: A vistrain checkpoint (from either engine; epoch-end or mid-epoch) to
            resume from.

    Returns:
        The trained ``TrainingModule``.

    Raises:
        ValueError: If ``experiment.trainer_kwargs`` holds a key this engine does not know,
            or the training data yields no batch.
    """
    trainer_kwargs = dict(experiment.trainer_kwargs)
    unknown = set(trainer_kwargs) - _TRAINER_KEYS - set(_STEP_KEYS)
    if unknown:
        raise ValueError(
            f"trainer_kwargs {sorted(unknown)} are not supported by the Lightning engine; "
            f"supported: {sorted(_TRAINER_KEYS | set(_STEP_KEYS))}."
        )
    check_trains_some_steps(experiment.train_dataloader)  # before any callback's setup
    step_options = {key: trainer_kwargs[key] for key in _STEP_KEYS if key in trainer_kwargs}
    module = TrainingModule(
        experiment.model,
        experiment.loss_module,
        experiment.optimizers,
        experiment.lr_schedulers,
        experiment.train_data_connector,
        experiment.test_data_connector,
        train_dataloader=experiment.train_dataloader,
        test_dataloader=experiment.test_dataloader,
        output_dir=output_dir,
        log_every_n_steps=int(trainer_kwargs.get("log_every_n_steps", 50)),
        tensorboard=bool(trainer_kwargs.get("tensorboard", True)),
        resume_from=ckpt_path,
        compile=trainer_kwargs.get("compile", False),
        channels_last=trainer_kwargs.get("channels_last", False),
        max_time=trainer_kwargs.get("max_time"),
        loggers=trainer_kwargs.get("loggers"),
        **step_options,
    )
    trainer = build_lightning_trainer(
        output_dir,
        num_epochs=int(trainer_kwargs.get("num_epochs", 1000)),
        num_steps=int(trainer_kwargs.get("num_steps", -1)),
        num_optimizers=len(module.engine.optimizers),
        check_val_every_n_epoch=trainer_kwargs.get("check_val_every_n_epoch", 1),
        val_check_interval=trainer_kwargs.get("val_check_interval"),
        callbacks=[CallbackWrapper(callback) for callback in experiment.callbacks],
    )
    with warnings.catch_warnings():
        # Lightning's advice about worker counts and small logging intervals does not apply:
        # the experiment chose its loaders, and Lightning's logger is off.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        if _only_ema_copies_in_eval_mode(module):  # an EMA adapter keeps its copy in eval mode
            warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")
        trainer.fit(module)
    return module


def _only_ema_copies_in_eval_mode(module: nn.Module) -> bool:
    """True when every module in eval mode belongs to an EMA adapter's averaged copy."""
    in_eval = [name for name, sub in module.named_modules() if not sub.training]
    return all(".ema_model" in f".{name}" for name in in_eval)


__all__ = ["build_lightning_trainer", "fit_with_lightning"]
