"""Run an experiment: process group, seeding, logging, building and the engine.

The command line calls these after validating its arguments; they also serve scripts
that want the same behaviour as ``vistrain fit`` / ``vistrain test``.
"""

from __future__ import annotations

import logging
import os
import random
from types import ModuleType
from typing import Any

import numpy as np
import torch

from vistrain.common.distributed import destroy_process_group, get_rank, init_process_group
from vistrain.common.logging import setup_logger
from vistrain.engine.checkpoint_io import check_model_state, load_checkpoint
from vistrain.engine.trainer import Trainer
from vistrain.model.adapter import find_ema_adapters
from vistrain.zoo.base import Experiment

logger = logging.getLogger("vistrain")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _build(module: ModuleType, params: Any, output_dir: str) -> Experiment:
    seed_everything(int(getattr(params, "seed", 0)))
    experiment = module.build(params, output_dir)
    if not isinstance(experiment, Experiment):
        raise TypeError(
            f"build() of {module.__name__} returned {type(experiment).__name__}; "
            "it must return a vistrain.zoo.base.Experiment."
        )
    return experiment


def _trainer(experiment: Experiment, output_dir: str) -> Trainer:
    return Trainer(
        device=_device(),
        output_dir=output_dir,
        train_dataloader=experiment.train_dataloader,
        test_dataloader=experiment.test_dataloader,
        train_data_connector=experiment.train_data_connector,
        test_data_connector=experiment.test_data_connector,
        callbacks=experiment.callbacks,
        **experiment.trainer_kwargs,
    )


def run_fit(
    module: ModuleType,
    params: Any,
    output_dir: str,
    ckpt_path: str | None = None,
    engine: str = "native",
) -> None:
    """Train the experiment of ``module`` with ``params``, writing into ``output_dir``."""
    created_group = init_process_group()
    finished = False
    try:
        os.makedirs(output_dir, exist_ok=True)
        setup_logger(log_file=os.path.join(output_dir, "log.txt") if get_rank() == 0 else None)
        logger.info("Run folder: %s", os.path.abspath(output_dir))
        experiment = _build(module, params, output_dir)
        if engine == "lightning":
            from vistrain.pl.runner import fit_with_lightning

            fit_with_lightning(experiment, output_dir, ckpt_path)
        else:
            _trainer(experiment, output_dir).fit(
                experiment.model,
                experiment.optimizers,
                experiment.lr_schedulers,
                experiment.loss_module,
                ckpt_path=ckpt_path,
            )
        del experiment
        finished = True
    finally:
        if created_group:
            destroy_process_group(wait_for_peers=finished)


def describe_weights(model: torch.nn.Module) -> str:
    """Which weights a test of ``model`` evaluates: EMA or raw."""
    adapters = find_ema_adapters(model)
    if adapters and adapters[0].eval_weights == "ema":
        return "EMA weights"
    return "raw model weights"


def run_test(module: ModuleType, params: Any, output_dir: str, ckpt_path: str) -> dict[str, float]:
    """Evaluate the weights of ``ckpt_path`` on the experiment's test data."""
    created_group = init_process_group()
    finished = False
    try:
        setup_logger()
        experiment = _build(module, params, output_dir)
        ckpt = load_checkpoint(ckpt_path)
        check_model_state(experiment.model, ckpt["state_dict"], ckpt_path)
        experiment.model.load_state_dict(ckpt["state_dict"])
        logger.info(
            "Evaluating the %s of %s (epoch %s, step %s).",
            describe_weights(experiment.model),
            ckpt_path,
            ckpt.get("epoch"),
            ckpt.get("global_step"),
        )
        logs = _trainer(experiment, output_dir).test(experiment.model)
        del experiment
        finished = True
        return logs
    finally:
        if created_group:
            destroy_process_group(wait_for_peers=finished)
