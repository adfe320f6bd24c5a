"""Run an experiment: process group, seeding, logging, building and the engine.

The command line calls these after validating its arguments; they also serve scripts
that want the same behaviour as ``vistrain fit`` / ``vistrain test``.

Every run carries a ``RunInfoCallback``, so its checkpoints name the experiment that
wrote them; a checkpoint whose weights do not fit is then reported with that name. A test
runs every callback but the checkpoint one (a test saves no checkpoint) and labels its
scalars with the checkpoint's epoch and step, so they line up with the run's validations.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from types import ModuleType
from typing import Any

import numpy as np
import torch

from vistrain.common.distributed import destroy_process_group, get_rank, init_process_group
from vistrain.common.log_setup import setup_logger
from vistrain.common.parent_death import die_with_parent
from vistrain.common.writable import check_writable_folder
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.checkpoint_io import CheckpointError, check_model_state, load_checkpoint
from vistrain.engine.nonfinite_guard import NonFiniteError
from vistrain.engine.stop_request import StopReport
from vistrain.engine.trainer import Trainer
from vistrain.model.adapter import find_ema_adapters
from vistrain.run_info import RunInfoCallback, checkpoint_experiment, experiment_name
from vistrain.run_params import (
    ResumeRefusedError,
    ScheduleReplanCallback,
    log_changes,
    params_record,
    plan_resume,
    write_params_json,
)
from vistrain.run_summary import log_run_summary
from vistrain.zoo.base import Experiment

logger = logging.getLogger("vistrain")

LAUNCH_PARENT = os.getppid()
"""The process that started this one, noted at import (before it could have died)."""


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class ExperimentBuildError(ValueError):
    """An experiment's ``build`` failed; the message names the config, the error and where."""


def raised_at(err: BaseException) -> str:
    """``file:line`` of the innermost frame of ``err``'s traceback (where it was raised)."""
    tb = err.__traceback__
    if tb is None:
        return "an unknown place"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def build_experiment(module: ModuleType, params: Any, output_dir: str) -> Experiment:
    """Call the experiment's ``build``, turning any error in it into one clear line.

    A ``ValueError`` or ``FileNotFoundError`` is the experiment's own message about bad
    settings or data and is kept as it is; any other error (a mistake in a config file's
    code) is reported with its type and the file and line that raised it.

    Raises:
        ExperimentBuildError: Naming the experiment and the error.
    """
    name = experiment_name(module)
    try:
        return module.build(params, output_dir)  # type: ignore[no-any-return]
    except (ValueError, FileNotFoundError) as err:
        raise ExperimentBuildError(f"config {name!r}: {err}") from err
    except Exception as err:
        raise ExperimentBuildError(
            f"config {name!r}: build() raised {type(err).__name__}: {err} (at "
            f"{raised_at(err)}); fix the config's build function"
        ) from err


def check_checkpoint_folders(callbacks: list[Callback]) -> None:
    """Refuse a run whose checkpoint folders cannot take files, before its first epoch.

    Raises:
        NotWritableError: Naming the folder and why (a file, read-only, a full disk).
    """
    for callback in callbacks:
        if isinstance(callback, CheckpointCallback):
            check_writable_folder(
                callback.output_dir,
                f"checkpoint folder {callback.output_dir!r}",
                "make it writable or pass another --output-dir",
            )


def _build(module: ModuleType, params: Any, output_dir: str) -> Experiment:
    seed_everything(int(getattr(params, "seed", 0)))
    experiment = build_experiment(module, params, output_dir)
    if not isinstance(experiment, Experiment):
        raise TypeError(
            f"build() of {module.__name__} returned {type(experiment).__name__}; "
            "it must return a vistrain.zoo.base.Experiment."
        )
    experiment.callbacks.append(RunInfoCallback(experiment_name(module), params_record(params)))
    return experiment


def _trainer(
    experiment: Experiment, output_dir: str, callbacks: list[Callback] | None = None
) -> Trainer:
    return Trainer(
        device=_device(),
        output_dir=output_dir,
        train_dataloader=experiment.train_dataloader,
        test_dataloader=experiment.test_dataloader,
        train_data_connector=experiment.train_data_connector,
        test_data_connector=experiment.test_data_connector,
        callbacks=experiment.callbacks if callbacks is None else callbacks,
        **experiment.trainer_kwargs,
    )


def foreign_checkpoint_error(
    ckpt_path: str, experiment: str, reason: CheckpointError
) -> CheckpointError:
    """``reason`` re-worded when ``ckpt_path`` was written by another experiment.

    Returns ``reason`` itself when the checkpoint names no experiment or this one.
    """
    try:
        origin = checkpoint_experiment(load_checkpoint(ckpt_path))
    except (CheckpointError, FileNotFoundError):
        return reason
    if origin is None or origin == experiment:
        return reason
    return CheckpointError(
        f"{ckpt_path} is a checkpoint of experiment {origin!r}, not {experiment!r}; "
        f"pass --config {origin} (or a checkpoint of {experiment})."
    )


def _fit_with(
    engine: str, experiment: Experiment, output_dir: str, ckpt_path: str | None
) -> StopReport | None:
    """Train with the chosen engine; return where it stopped early, if it did."""
    if engine == "lightning":
        from vistrain.pl.fit import fit_with_lightning
        from vistrain.pl.quiet import quiet_lightning

        with quiet_lightning():
            module = fit_with_lightning(experiment, output_dir, ckpt_path)
        return module.engine.loop.stop_report
    trainer = _trainer(experiment, output_dir)
    trainer.fit(
        experiment.model,
        experiment.optimizers,
        experiment.lr_schedulers,
        experiment.loss_module,
        ckpt_path=ckpt_path,
    )
    return trainer.loop.stop_report


def _plan_resume(module: ModuleType, params: Any, ckpt_path: str) -> bool | None:
    """Check a resume's parameters against the checkpoint's and log what changed.

    Returns:
        Whether the schedule must be re-planned; None when the run has finished already.

    Raises:
        ResumeRefusedError: For a change the checkpoint cannot continue with (also logged).
    """
    try:
        plan = plan_resume(module, params, ckpt_path)
    except ResumeRefusedError as err:
        logger.error("%s", err)
        raise
    if plan.finished:
        logger.info("%s", plan.message)
        return None
    log_changes(plan, ckpt_path)
    return plan.replan


def run_fit(
    module: ModuleType,
    params: Any,
    output_dir: str,
    ckpt_path: str | None = None,
    engine: str = "native",
) -> StopReport | None:
    """Train the experiment of ``module`` with ``params``, writing into ``output_dir``.

    Writes ``params.json``; a resume first compares ``params`` with the checkpoint's run
    (``vistrain.run_params``): it lists the changes, re-plans the schedule for those that
    need it, and returns at once when the run has already trained all its epochs.

    Raises:
        ResumeRefusedError: If ``ckpt_path``'s run cannot continue with ``params``.
        NonFiniteError: If training produced a NaN/Inf loss or weights (also logged).
        ExperimentBuildError: If the experiment's ``build`` fails.
        NotWritableError: If a checkpoint folder cannot take files (checked before training).
        CheckpointError: If ``ckpt_path`` cannot continue this run.

    Started by a launcher (``torchrun``), the process ends when the launcher does, however
    the launcher ends (``vistrain.common.parent_death``).

    Returns:
        Where the run stopped when a stop was requested (a signal, early stopping), else None.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent(signal.SIGKILL, parent=LAUNCH_PARENT)
    created_group = init_process_group()
    finished = False
    started = time.perf_counter()
    try:
        os.makedirs(output_dir, exist_ok=True)
        setup_logger(log_file=os.path.join(output_dir, "log.txt") if get_rank() == 0 else None)
        logger.info("Run folder: %s", os.path.abspath(output_dir))
        replan: bool | None = False
        if ckpt_path is not None:
            replan = _plan_resume(module, params, ckpt_path)
            if replan is None:
                finished = True
                return None
        if get_rank() == 0:
            write_params_json(output_dir, experiment_name(module), params)
        experiment = _build(module, params, output_dir)
        if replan:
            experiment.callbacks.insert(
                0, ScheduleReplanCallback(experiment.optimizers, experiment.lr_schedulers)
            )
        if get_rank() == 0:
            check_checkpoint_folders(experiment.callbacks)
        try:
            stopped = _fit_with(engine, experiment, output_dir, ckpt_path)
        except CheckpointError as err:
            if ckpt_path is None:
                raise
            raise foreign_checkpoint_error(ckpt_path, experiment_name(module), err) from None
        except NonFiniteError as err:
            logger.error("%s", err)
            raise
        del experiment
        finished = True
        if stopped is None or stopped.request.exit_code == 0:
            log_run_summary(module, params, output_dir, time.perf_counter() - started)
        return stopped
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
    """Evaluate the weights of ``ckpt_path`` on the experiment's test data.

    Pictures, saved predictions, scalars and ``log.txt`` go to ``output_dir``; the scalars
    carry the checkpoint's epoch and global step. Nothing is written there before the
    checkpoint is known to fit.

    Raises:
        CheckpointError: If the file is not a readable vistrain checkpoint or its weights
            do not fit the model (naming the experiment that wrote it, when another one).
    """
    created_group = init_process_group()
    finished = False
    try:
        setup_logger()
        experiment = _build(module, params, output_dir)
        ckpt = load_checkpoint(ckpt_path)
        try:
            check_model_state(experiment.model, ckpt["state_dict"], ckpt_path)
        except CheckpointError as err:
            raise foreign_checkpoint_error(ckpt_path, experiment_name(module), err) from None
        experiment.model.load_state_dict(ckpt["state_dict"])
        os.makedirs(output_dir, exist_ok=True)
        setup_logger(log_file=os.path.join(output_dir, "log.txt") if get_rank() == 0 else None)
        epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("global_step", 0))
        logger.info(
            "Evaluating the %s of %s (epoch %d, step %d).",
            describe_weights(experiment.model),
            ckpt_path,
            epoch,
            step,
        )
        tester = _trainer(
            experiment,
            output_dir,
            [cb for cb in experiment.callbacks if not isinstance(cb, CheckpointCallback)],
        )
        tester.loop.current_epoch, tester.loop.global_step = epoch, step
        logs = tester.test(experiment.model)
        del experiment
        finished = True
        return logs
    finally:
        if created_group:
            destroy_process_group(wait_for_peers=finished)
