"""The native training loop.

``Trainer`` runs training and testing and calls every callback's hooks, in list order,
at these points::

    callbacks.setup(); resume from ckpt_path if given
    for epoch in range(start_epoch, num_epochs):
        on_train_epoch_start(state, model, loss_module)
        model.train(); sampler.set_epoch(epoch)
        for batch_idx, batch in enumerate(train_dataloader):
            on_train_batch_start(state, model, loss_module, batch, batch_idx)  # may edit batch
            with autocast (precision), and DDP's no_sync inside an accumulation window:
                outputs = model(**train_data_connector(batch))
                loss, metrics = loss_module(outputs, batch)
                (loss / accumulate_grad_batches).backward()   # scaled under "16-mixed"
            at a window's end (every accumulate_grad_batches batches, the epoch's last):
                unscale; on_before_optimizer_step(state, model, optimizer); clip
                optimizer.step() for every optimizer; global_step += 1
                scheduler.step_on_batch(global_step) unless fp16 skipped the step
            logs = on_train_batch_end(state, model, loss_module, outputs, batch, batch_idx)
            -> logs written as train/<key>
            at a window's end: validate when val_check_interval divides global_step;
            stop here when the step limit is reached or a stop was requested (a signal,
            request_stop: early stopping, or max_time spent); an agreed stop saves a
            checkpoint at this step first
        scheduler.step(epoch) for every scheduler
        on_train_epoch_end(state, model, loss_module)
        validate when (epoch + 1) % check_val_every_n_epoch == 0
        stop here when a stop was requested
    on_fit_end(state, model)

A stop request (SIGTERM, SIGINT, SIGUSR1 while ``fit`` runs, or ``loop.request_stop``) is
agreed by all ranks at those two points, and a checkpoint is written there (see
``vistrain.engine.loop_state``); ``on_fit_end`` still runs and ``loop.stop_report`` tells
where the run stopped.

    validate / test:
        model.eval(); on_test_epoch_start(state, model)
        for each test dataloader, for each batch:
            outputs = model(**test_data_connector(batch))
            on_test_batch_end(state, model, outputs, batch, batch_idx, dataloader_idx)
        logs = on_test_epoch_end(state, model) -> val/<key> (during fit) or test/<key>
        during fit: on_validation_end(state, model), the state holding the new val_logs

Batch hooks run for every micro-batch; ``global_step`` counts optimizer steps and stays put
between a window's micro-batches (``trainer_state["step_end"]`` says whether this batch
stepped). Every hook gets a TrainerState built for that call; the per-batch hooks are called
only on the callbacks that override them (``callbacks_overriding``: skipping the base class's
no-op changes nothing, and no state is built for a hook no callback has). The bookkeeping
(position, states, step, logs, checkpoint contents, resume) is
``vistrain.engine.loop_state.LoopState``, shared with the Lightning engine; this module holds
only the native step loop.

Validation never changes the global random generators' states (they are restored after
it), so training randomness does not depend on how often a run validates or whether it
was resumed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.common.checks import check_list_of, check_positive_int
from vistrain.common.device import resolve_device
from vistrain.common.distributed import is_distributed
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback, callbacks_overriding
from vistrain.engine.callbacks.logging import log_callback_train_logs
from vistrain.engine.connectors import DataConnector
from vistrain.engine.device_setup import (
    check_channels_last,
    check_compile,
    move_to_device,
    prepare_model,
    to_channels_last,
)
from vistrain.engine.loop_state import (
    LoopState,
    as_loader_list,
    check_loop_limits,
    check_trains_some_steps,
)
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import LRSchedulerWrapper, check_optimizers_train
from vistrain.engine.optimizer_step import check_step_options
from vistrain.engine.rng import preserved_rng_state
from vistrain.engine.scalar_writers import check_logger_names
from vistrain.engine.stop_signal import StopSignals
from vistrain.engine.time_budget import parse_max_time


def _forward(
    model: nn.Module,
    loss_module: LossModule,
    connector: DataConnector,
    batch: Any,
    autocast: contextlib.AbstractContextManager[Any] | None,
) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """Connector, model and loss of one micro-batch: ``(outputs, total_loss, metrics)``.

    Under ``autocast`` unless it is None (``"32"``: no context at all); the backward that
    follows runs outside it, as torch recommends.
    """
    if autocast is not None:
        with autocast:
            return _forward(model, loss_module, connector, batch, None)
    inputs = connector(batch)
    outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    total_loss, metrics = loss_module(outputs, batch)
    return outputs, total_loss, metrics


class Trainer:
    """Runs the training and testing loops and calls the callbacks (see the module docstring).

    Args:
        device: Device to train on (``"cpu"``, ``"cuda"``, ``torch.device``).
        output_dir: Folder for scalar logs (``metrics.jsonl``, TensorBoard files).
        train_dataloader: Training data; None for a test-only trainer.
        test_dataloader: One or several test dataloaders; None to never validate.
        train_data_connector: Picks the model's training inputs out of a batch.
        test_data_connector: Picks the model's test inputs out of a batch.
        callbacks: Callbacks, called in list order.
        num_epochs: Epoch limit (-1 = none).
        num_steps: Optimizer-step limit (-1 = none); training stops right after that step.
        check_val_every_n_epoch: Validate after every n-th epoch (None or 0 = never by epoch).
        val_check_interval: Validate every n optimizer steps (None = never by step), after
            the batch that ends the step's window (an epoch's last, partial window too).
        log_every_n_steps: Write the learning rates (and ``train/grad_norm``) every n steps.
        tensorboard: Also write TensorBoard event files next to ``metrics.jsonl``.
        compile: Compile the model's forward in place (``True``: the inductor backend; a
            string: that ``torch.compile`` backend, e.g. ``"eager"``); parameter names, and
            so checkpoints, stay those of the plain model (``vistrain.engine.device_setup``).
        channels_last: Keep the model's 4-D weights and the batches' 4-D floating-point
            tensors in the channels-last memory format.
        max_time: Training-time budget: seconds or ``"DD:HH:MM:SS"``; training stops at the
            step boundary where it is spent and a checkpoint is saved. Counts time inside
            ``fit`` of this and earlier (resumed) segments. None: no budget.
        loggers: Scalar writer names (``"jsonl"``, ``"tb"``, ``"csv"``, ``"wandb"``,
            ``"mlflow"``: ``vistrain.engine.scalar_writers``); None: ``jsonl`` plus ``tb``
            when ``tensorboard``.
        precision: ``"32"``; ``"bf16-mixed"`` or ``"16-mixed"`` run the forward and the loss
            under ``torch.autocast`` for the device; ``"16-mixed"`` also scales the loss
            (``torch.amp.GradScaler``; a step with inf/nan gradients is skipped, counted as
            ``train/skipped_steps``, and moves neither the schedulers nor the EMA).
        accumulate_grad_batches: Batches per optimizer step; each loss is divided by it. The
            last, partial window of an epoch steps too (its gradients are the partial sum).
            ``global_step``, schedulers, EMA and ``log_every_n_steps`` count optimizer steps.
        gradient_clip_val: Clip the gradients after unscaling, before the step (None: never).
        gradient_clip_algorithm: ``"norm"`` (the total 2-norm of all gradients) or
            ``"value"`` (each element to ``[-val, val]``).

    Raises:
        ValueError: If a limit, an interval or a step option is out of range, ``device`` is
            not a device or not available on this machine, or ``compile`` names no backend.
        NotADirectoryError: If ``output_dir`` is an existing file.
        TypeError: If a callback does not subclass ``Callback``, or ``compile`` or
            ``channels_last`` has the wrong type.
    """

    def __init__(
        self,
        device: str | torch.device,
        output_dir: str,
        train_dataloader: DataLoader[DictData] | None,
        test_dataloader: DataLoader[DictData] | Sequence[DataLoader[DictData]] | None,
        train_data_connector: DataConnector | None,
        test_data_connector: DataConnector | None,
        callbacks: Sequence[Callback],
        num_epochs: int = 1000,
        num_steps: int = -1,
        check_val_every_n_epoch: int | None = 1,
        val_check_interval: int | None = None,
        log_every_n_steps: int = 50,
        tensorboard: bool = True,
        compile: bool | str = False,
        channels_last: bool = False,
        max_time: float | str | None = None,
        loggers: Sequence[str] | None = None,
        precision: str = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        max_seconds = parse_max_time(max_time)
        logger_names = check_logger_names(loggers)
        check_step_options(
            precision, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm
        )
        check_loop_limits(
            num_epochs, num_steps, check_val_every_n_epoch, val_check_interval, log_every_n_steps
        )
        check_compile(compile)
        check_channels_last(channels_last)
        self.compile = compile
        self.channels_last = channels_last
        callback_list = check_list_of("callbacks", list(callbacks), Callback)
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise NotADirectoryError(
                f"output_dir={output_dir!r} is a file; give a folder (it is created if missing)."
            )
        self.device = resolve_device(device)
        self.output_dir = output_dir
        self.test_dataloader: list[DataLoader[DictData]] | None = (
            as_loader_list(test_dataloader) or None
        )
        self.train_data_connector = train_data_connector
        self.test_data_connector = test_data_connector
        self.callbacks = callback_list
        self.check_val_every_n_epoch = check_val_every_n_epoch or None
        self.val_check_interval = val_check_interval
        self.loop = LoopState(
            engine=self,
            engine_name="native",
            callbacks=self.callbacks,
            optimizers=[],
            lr_schedulers=[],
            train_dataloader=train_dataloader,
            test_dataloaders=list(self.test_dataloader or []),
            loss_module=None,
            num_epochs=num_epochs,
            num_steps=num_steps,
            log_every_n_steps=log_every_n_steps,
            tensorboard=tensorboard,
            max_time=max_seconds,
            loggers=logger_names,
            precision=precision,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )
        self.loop.use_device(self.device)
        self._setup_done = False
        self._fitting = False

    # ----------------------------------------------------------------- engine API
    @property
    def train_dataloader(self) -> DataLoader[DictData] | None:
        """The loader the current (or next) epoch trains on."""
        return self.loop.train_dataloader

    @property
    def global_step(self) -> int:
        """Optimizer steps done (once per step, however many optimizers)."""
        return self.loop.global_step

    @property
    def current_epoch(self) -> int:
        """The current epoch (0-based)."""
        return self.loop.current_epoch

    def set_train_dataloader(self, dataloader: DataLoader[Any]) -> None:
        """Train on ``dataloader`` from the next epoch start on (a running epoch is not cut).

        Called from ``on_train_epoch_start``, the new loader already serves that epoch.
        """
        self.loop.set_train_dataloader(dataloader)

    def set_check_val_every_n_epoch(self, every_n_epochs: int) -> None:
        """Validate every ``every_n_epochs`` epochs from now on."""
        check_positive_int("every_n_epochs", every_n_epochs)
        self.check_val_every_n_epoch = every_n_epochs

    def request_stop(self, reason: str, exit_code: int = 0, checkpoint: bool = True) -> None:
        """End training at the next step boundary (see ``LoopState.request_stop``)."""
        self.loop.request_stop(reason, exit_code, checkpoint)

    def checkpoint_state(self) -> dict[str, Any]:
        """Collective: the complete training state; every rank must call it.

        See ``vistrain.engine.resume.collect_checkpoint`` for the contents.
        """
        if not self._fitting:
            raise RuntimeError("checkpoint_state() is only available while fit() runs.")
        return self.loop.checkpoint_state()

    def _setup(self) -> None:
        if not self._setup_done:
            for callback in self.callbacks:
                callback.setup()
            self._setup_done = True

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        model = prepare_model(model, self.device, self.compile, self.channels_last)
        needs_ddp = is_distributed() and not isinstance(model, nn.parallel.DistributedDataParallel)
        if needs_ddp and any(p.requires_grad for p in model.parameters()):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    def fit(
        self,
        model: nn.Module,
        optimizers: Optimizer | Sequence[Optimizer],
        lr_schedulers: LRSchedulerWrapper | Sequence[LRSchedulerWrapper] | None,
        loss_module: LossModule,
        ckpt_path: str | None = None,
    ) -> None:
        """Train ``model``; resume from ``ckpt_path`` when given.

        Raises:
            ValueError: If there is no training data or connector, the data yields no batch
                (``check_trains_some_steps``), an optimizer holds none of
                the parameters of ``model`` and ``loss_module``, or the checkpoint does not
                fit (nothing is changed in that case).
            FileNotFoundError: If ``ckpt_path`` does not exist.
        """
        loop = self.loop
        if loop.train_dataloader is None or self.train_data_connector is None:
            raise ValueError("fit() needs train_dataloader and train_data_connector.")
        check_trains_some_steps(loop.train_dataloader)
        if not isinstance(loss_module, LossModule):
            raise TypeError(f"loss_module must be a LossModule, got {type(loss_module).__name__}.")
        loop.optimizers = check_list_of("optimizers", optimizers, Optimizer)
        if not loop.optimizers:
            raise ValueError("fit() needs at least one optimizer.")
        loop.lr_schedulers = check_list_of("lr_schedulers", lr_schedulers, LRSchedulerWrapper)
        check_optimizers_train(loop.optimizers, model, loss_module)
        model = self._wrap_model(model)
        loss_module.to(self.device)
        loop.model, loop.loss_module = model, loss_module
        self._fitting = True
        self._setup()
        signals = StopSignals()
        try:
            signals.install()
            point = loop.resume(ckpt_path) if ckpt_path is not None else None
            loop.open_scalars(self.output_dir, resumed=point is not None)
            self._fit_loop(
                model,
                loss_module,
                start_epoch=0 if point is None else point.start_epoch,
                skip_batches=0 if point is None else point.skip_batches,
                resume_rng=None if point is None else point.resume_rng,
            )
            state = loop.state()
            for callback in self.callbacks:
                callback.on_fit_end(state, model)
        finally:
            signals.uninstall()
            loop.close_scalars()
            self._fitting = False

    def _fit_loop(
        self,
        model: nn.Module,
        loss_module: LossModule,
        start_epoch: int,
        skip_batches: int,
        resume_rng: tuple[dict[str, Any], dict[str, Any]] | None,
    ) -> None:
        loop = self.loop
        epoch = start_epoch
        while (loop.num_epochs == -1 or epoch < loop.num_epochs) and not loop.ending:
            loop.start_epoch(epoch, skip_batches)
            self._train_epoch(model, loss_module, skip_batches, resume_rng)
            skip_batches, resume_rng = 0, None
            if not loop.epoch_finished or loop.stop_requested():
                break
            epoch += 1

    def _train_epoch(
        self,
        model: nn.Module,
        loss_module: LossModule,
        skip_batches: int,
        resume_rng: tuple[dict[str, Any], dict[str, Any]] | None,
    ) -> None:
        loop = self.loop
        state = loop.state()
        for callback in self.callbacks:
            callback.on_train_epoch_start(state, model, loss_module)
        model.train()
        iterator: Iterator[Any] = loop.epoch_iterator(skip_batches, resume_rng)
        connector = self.train_data_connector
        if connector is None:
            raise RuntimeError("No train data connector.")
        batch_idx = skip_batches
        move_batches = self.device.type != "cpu"  # loaders yield CPU tensors already
        channels_last = self.channels_last
        # Per-step path, kept flat: on a short step every call and lookup shows in
        # benchmarks/overhead.py. The hooks still run in the order of the module docstring,
        # on the callbacks that override them (a base no-op skipped is not seen, and a hook
        # nobody overrides needs no TrainerState); no context is entered where none is needed.
        start_hooks = callbacks_overriding(self.callbacks, "on_train_batch_start")
        end_hooks = callbacks_overriding(self.callbacks, "on_train_batch_end")
        batch_end_state = loop.batch_end_states()
        optimizers = loop.optimizers
        val_every = self.val_check_interval
        log_every = loop.log_every_n_steps
        autocast = loop.stepper.autocast_context  # None for "32"
        accumulating = loop.stepper.accumulate_grad_batches > 1
        # DDP's no_sync is only ever needed inside accumulation windows.
        ddp = model if accumulating and isinstance(model, DistributedDataParallel) else None
        for batch in iterator:
            if move_batches:
                batch = move_to_device(batch, self.device)
            if channels_last:
                batch = to_channels_last(batch)
            if start_hooks:
                state = loop.state()
                for callback in start_hooks:
                    callback.on_train_batch_start(state, model, loss_module, batch, batch_idx)
            if ddp is None or loop.ends_window(batch_idx + 1):
                outputs, total_loss, metrics = _forward(
                    model, loss_module, connector, batch, autocast
                )
                step_end = loop.train_step(total_loss, metrics, optimizers, batch_idx + 1)
            else:  # inside an accumulation window DDP must not all-reduce
                with ddp.no_sync():
                    outputs, total_loss, metrics = _forward(
                        model, loss_module, connector, batch, autocast
                    )
                    step_end = loop.train_step(total_loss, metrics, optimizers, batch_idx + 1)
            logs: MetricLogs | None = None
            if end_hooks:
                state = batch_end_state()
                for callback in end_hooks:
                    cb_logs = callback.on_train_batch_end(
                        state, model, loss_module, outputs, batch, batch_idx
                    )
                    if cb_logs:
                        logs = dict(cb_logs) if logs is None else {**logs, **cb_logs}
                        log_callback_train_logs(callback, cb_logs, state)
            step = loop.global_step
            if logs or (step_end and (step % log_every == 0 or step == 1)):  # log_train's test
                loop.log_train(logs)
            batch_idx += 1
            if not step_end and accumulating:
                continue  # no step was taken: step-based validation and stops wait for it
            if val_every and step % val_every == 0:
                self._validate(model)
                model.train()
            if loop.stop_requested():
                return
        loop.finish_epoch()
        every = self.check_val_every_n_epoch
        if every and (loop.current_epoch + 1) % every == 0:
            self._validate(model)

    def _validate(self, model: nn.Module) -> None:
        """Run the test loop as validation; its RNG use never reaches training."""
        if not self.test_dataloader:
            return
        with preserved_rng_state():
            logs = self._run_test(model)
            self.loop.end_validation(logs)

    # ----------------------------------------------------------------- test
    @torch.no_grad()
    def _run_test(self, model: nn.Module) -> MetricLogs:
        if not self.test_dataloader or self.test_data_connector is None:
            raise ValueError("Testing needs test_dataloader and test_data_connector.")
        model.eval()
        state = self.loop.state(training=self._fitting)
        for callback in self.callbacks:
            callback.on_test_epoch_start(state, model)
        for loader_idx, loader in enumerate(self.test_dataloader):
            for batch_idx, raw_batch in enumerate(loader):
                batch = move_to_device(raw_batch, self.device)
                if self.channels_last:
                    batch = to_channels_last(batch)
                inputs = self.test_data_connector(batch)
                outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
                state = self.loop.state(training=self._fitting)
                for callback in self.callbacks:
                    callback.on_test_batch_end(
                        state, model, outputs, batch, batch_idx, dataloader_idx=loader_idx
                    )
        logs: MetricLogs = {}
        state = self.loop.state(training=self._fitting)
        for callback in self.callbacks:
            cb_logs = callback.on_test_epoch_end(state, model)
            if cb_logs:
                logs.update(cb_logs)
        return logs

    def test(self, model: nn.Module) -> dict[str, float]:
        """Evaluate ``model`` on the test dataloaders; logs go to ``test/<key>``.

        Returns:
            The logs returned by the callbacks' ``on_test_epoch_end``, as floats.
        """
        model = prepare_model(model, self.device, self.compile, self.channels_last)
        self.loop.model = model
        self._setup()
        logs = self._run_test(model)
        return self.loop.write_test_logs(logs, self.output_dir)
