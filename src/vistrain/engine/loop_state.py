"""The bookkeeping both engines share: loop position, what each hook sees, checkpoint contents.

The native ``Trainer`` runs its own step loop and the Lightning bridge maps Lightning's hooks
onto the same points; both keep their loop position in one ``LoopState`` and go through it
for everything that is not their own::

    engine                                  LoopState
    fit start                               resume(ckpt_path); open_scalars()
    epoch start                             start_epoch(epoch) -> position reset
    hooks                                   state() -> a fresh TrainerState per hook
    first batch                             epoch_iterator() -> adopts a handed-over loader,
                                            sampler.set_epoch, epoch-start RNG, skip on resume
    forward, loss                           (the engine's own)
    backward + optimizer step               train_step(loss, metrics, optimizers, ...) -> the
                                            losses go to the non-finite guard (no sync)
    after on_train_batch_end                log_train(logs) (log steps: guard.check());
                                            stop_requested() (collective)
    a signal, a callback, the time budget   request_stop(reason) -> agreed at the next boundary,
                                            which saves a checkpoint and flushes the scalars
    after a validation's on_test_epoch_end  end_validation(logs) -> val/<k>, on_validation_end
    epoch end                               finish_epoch() -> schedulers.step, on_train_epoch_end
    CheckpointCallback                      checkpoint_state() (engine.checkpoint_state()),
                                            guard.check() first

So a change of the step itself (precision, accumulation, clipping) lands in ``train_step``
and a stop request (a signal, a time budget) in ``stop_requested``, once for both engines.

Stopping early: anything may call ``request_stop(reason, exit_code, checkpoint)`` (early
stopping, a time budget); a SIGTERM, SIGINT or SIGUSR1 becomes one while the engine has
``vistrain.engine.stop_signal.StopSignals`` installed. At the next step boundary
``stop_requested`` lets the ranks agree (one all-reduce when distributed, see
``stop_request.agree_on_stop``), writes a checkpoint at that step through every
``CheckpointCallback`` (``save_now``), flushes the scalar files and returns True; the engine
leaves its loop as after the step limit and ``stop_report`` says where it stopped.

Micro-batches and steps. With ``accumulate_grad_batches = k`` every batch is a micro-batch:
its forward and loss run under ``autocast()``, ``train_step`` back-propagates ``loss / k``
and, when the batch ends a window (every k-th batch of an epoch, and the epoch's last
batch, so a last partial window steps too), unscales, runs ``on_before_optimizer_step``,
clips and steps; only then does ``global_step`` advance. The batch hooks run for every
micro-batch; the state of ``on_train_batch_end`` says ``step_end`` (this batch ended a
window, ``global_step`` just advanced) and ``step_skipped`` (fp16 found inf/nan gradients:
the weights did not change). Step-based work -- logs, validation, step checkpoints, the
schedulers' ``step_on_batch``, the EMA -- happens on ``step_end`` batches only, and the
schedulers and the EMA not on skipped ones. A skipped step still counts in ``global_step``
(as in Lightning and Hugging Face), so step limits and intervals do not depend on overflows.
More than ``guard.max_skipped_steps`` (100) skipped steps in a row stop the run with
``NonFiniteError``: a diverged fp16 run would otherwise skip every step from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.common.checks import check_list_of, check_positive_int
from vistrain.common.distributed import all_gather_object, get_rank, is_distributed
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback, callbacks_overriding
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.logging import log_evaluation_logs
from vistrain.engine.callbacks.trainer_state import StepMetrics, TrainerState, TrainingEngine
from vistrain.engine.loss_module import LossModule
from vistrain.engine.nonfinite_guard import NonFiniteGuard
from vistrain.engine.optim import LRSchedulerWrapper, lr_scalars
from vistrain.engine.optimizer_step import (
    OptimizerStepper,
    accumulated_grads,
    restore_accumulated_grads,
)
from vistrain.engine.resume import ResumePoint, collect_checkpoint, restore_checkpoint
from vistrain.engine.rng import start_epoch_iterator
from vistrain.engine.scalar_log import ScalarLogger
from vistrain.engine.stop_request import StopReport, StopRequest, agree_on_stop
from vistrain.engine.stop_signal import received_stop
from vistrain.engine.time_budget import TimeBudget


def num_batches(loader: Any) -> int | None:
    """Batches per epoch of ``loader``, or None when it has no length."""
    if loader is None:
        return None
    try:
        return len(loader)
    except TypeError:
        return None


class NoTrainingStepsError(ValueError):
    """The training data yields no batch per epoch, so a run would train nothing."""


def check_trains_some_steps(loader: Any) -> None:
    """Refuse training data that yields no batch per epoch (both engines, before training).

    Such a run would write step-0 checkpoints and end "successfully" without one step. A
    loader without a length (an iterable data set) cannot be checked and passes.

    Raises:
        NoTrainingStepsError: Naming the samples, the batch size and ``drop_last``, and
            the fix.
    """
    if num_batches(loader) != 0:
        return
    dataset = getattr(loader, "dataset", None)
    try:
        samples = f"{len(dataset)} samples"  # type: ignore[arg-type]
    except TypeError:
        samples = "its samples"
    batch_size = getattr(loader, "batch_size", None)
    drop_last = bool(getattr(loader, "drop_last", False))
    raise NoTrainingStepsError(
        f"the training data yields no batch: {samples}, batch_size={batch_size} per process, "
        f"drop_last={drop_last}; add training samples or lower batch_size so that at least "
        "one full batch fits."
    )


NO_LIMIT = {-1: "no limit"}
"""The special value of ``num_epochs`` / ``num_steps``."""


def as_loader_list(value: DataLoader[Any] | Sequence[DataLoader[Any]] | None) -> list[Any]:
    """Test loaders as a list (one loader, several, or None).

    Raises:
        TypeError: If an item is not a ``DataLoader``.
    """
    if isinstance(value, DataLoader):
        return [value]
    return check_list_of("test_dataloader", None if value is None else list(value), DataLoader)


def check_loop_limits(
    num_epochs: int,
    num_steps: int,
    check_val_every_n_epoch: int | None,
    val_check_interval: int | None,
    log_every_n_steps: int = 1,
) -> None:
    """Refuse loop limits and intervals out of range (both engines take the same ones).

    Raises:
        TypeError: If one is not an int.
        ValueError: Naming the value and what to use instead.
    """
    check_positive_int("num_epochs", num_epochs, NO_LIMIT)
    check_positive_int("num_steps", num_steps, NO_LIMIT)
    check_positive_int(
        "check_val_every_n_epoch", check_val_every_n_epoch, {None: "never", 0: "never"}
    )
    check_positive_int("val_check_interval", val_check_interval, {None: "never by step"})
    check_positive_int("log_every_n_steps", log_every_n_steps)


class LoopState:
    """Loop position, latest validation, scalar writers and callbacks of one training run.

    Owned by an engine (``engine`` is what callbacks see as ``trainer_state["train_module"]``);
    the engine sets ``model`` before training and moves ``current_epoch`` as its loop does.

    Args:
        engine: The engine running the loop (``TrainingEngine``).
        engine_name: ``"native"`` or ``"pl"`` (``trainer_state["train_engine"]``).
        callbacks: The vistrain callbacks, in hook order (the list may grow until training
            starts: Lightning registers them at its ``setup``).
        optimizers: Optimizers, each stepped once per training step.
        lr_schedulers: Scheduler wrappers: ``step_on_batch`` per step, ``step`` per epoch.
        train_dataloader: Training data (None for a test-only engine).
        test_dataloaders: Validation / test loaders.
        loss_module: The training loss module.
        num_epochs: Epoch limit (-1 = none).
        num_steps: Training-step limit (-1 = none).
        log_every_n_steps: Write the learning rates (and ``grad_norm``) every n steps.
        tensorboard: Also write TensorBoard event files next to ``metrics.jsonl``.
        max_time: Training-time budget in seconds (None = none), see ``time_budget``.
        loggers: Scalar writers by name (``vistrain.engine.scalar_writers``); None: the
            default (``metrics.jsonl``, plus TensorBoard when ``tensorboard``).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (see ``OptimizerStepper``).
        accumulate_grad_batches: Micro-batches per optimizer step.
        gradient_clip_val: Clip threshold (None: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.

    Raises:
        ValueError: For a step option out of range (``check_step_options``).
    """

    def __init__(
        self,
        engine: TrainingEngine,
        engine_name: str,
        callbacks: list[Callback],
        optimizers: list[Optimizer],
        lr_schedulers: list[LRSchedulerWrapper],
        train_dataloader: DataLoader[DictData] | None,
        test_dataloaders: list[DataLoader[DictData]],
        loss_module: LossModule | None,
        num_epochs: int,
        num_steps: int,
        log_every_n_steps: int,
        tensorboard: bool,
        max_time: float | None = None,
        loggers: Sequence[str] | None = None,
        precision: str = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        self._step_options = (
            precision,
            accumulate_grad_batches,
            gradient_clip_val,
            gradient_clip_algorithm,
        )
        self.stepper = OptimizerStepper(torch.device("cpu"), *self._step_options)
        self.accumulated = 0  # micro-batches back-propagated in the open window
        self._zeroed_by_step = False  # the last window's step left the gradients at None
        # The open window's losses, handed to the non-finite guard when the window steps:
        # a step the fp16 scaler skips (inf/nan gradients, often an inf loss) is the
        # scaler's to handle, not a divergence.
        self._window_losses: list[tuple[torch.Tensor, dict[str, Any], int]] = []
        self.step_end = True  # the latest batch ended a window (global_step advanced)
        self.step_skipped = False  # ... and fp16 loss scaling skipped that step
        self._hook_callbacks: list[Callback] | None = None
        self._callback_count = 0
        self.engine = engine
        self.engine_name = engine_name
        self.callbacks = callbacks
        self.optimizers = optimizers
        self.lr_schedulers = lr_schedulers
        self.test_dataloaders = test_dataloaders
        self.loss_module = loss_module  # a property: also decides what the guard watches
        self.num_epochs = num_epochs
        self.num_steps = num_steps
        self.log_every_n_steps = log_every_n_steps
        self.tensorboard = tensorboard
        self.loggers = None if loggers is None else list(loggers)
        self.model: nn.Module | None = None
        self.guard = NonFiniteGuard()  # checked on log steps and before every checkpoint
        self.time_budget = TimeBudget(max_time)

        self.current_epoch = 0
        self.global_step = 0
        self.batches_done = 0
        self.epoch_finished = False
        self.val_logs: dict[str, float] = {}
        self.metrics: StepMetrics | None = None  # the latest step's, for on_train_batch_end
        self.epoch_start_rng: dict[str, Any] | None = None
        self.pending_train_dataloader: DataLoader[DictData] | None = None
        self.scalars: ScalarLogger | None = None
        self.train_dataloader: DataLoader[DictData] | None = None
        self.stop: StopRequest | None = None  # the stop all ranks agreed on
        self.stop_report: StopReport | None = None
        self._requested_stop: StopRequest | None = None  # this rank's own request
        # Whether stops need the ranks' agreement: read at fit start (``open_scalars``),
        # so the per-step stop check tests a flag instead of the process group.
        self._distributed: bool | None = None
        self._num_train_batches: int | None = None
        self._test_dataloader_list = list(test_dataloaders) or None
        self._num_test_batches = [num_batches(dl) or 0 for dl in test_dataloaders] or None
        self._use_train_dataloader(train_dataloader)

    @property
    def loss_module(self) -> LossModule | None:
        """The training loss module (the engines set it when training starts)."""
        return self._loss_module

    @loss_module.setter
    def loss_module(self, loss_module: LossModule | None) -> None:
        self._loss_module = loss_module
        # LossModule's own forward returns the detached total as metrics["loss"]: the guard
        # watches that one. A subclass with its own forward makes no such promise, so its
        # total is detached again. Decided here, once, not per micro-batch.
        self._metrics_hold_total = (
            loss_module is not None and type(loss_module).forward is LossModule.forward
        )

    def _use_train_dataloader(self, loader: DataLoader[DictData] | None) -> None:
        self.train_dataloader = loader
        self._num_train_batches = num_batches(loader)

    # ------------------------------------------------------------------ what hooks see
    def state(self, training: bool = True, metrics: bool = False) -> TrainerState:
        """A new TrainerState for one hook call (no hook sees what another hook changed).

        The native engine hands one state to all callbacks of a hook call; the Lightning
        bridge builds one per callback (each wrapper is its own Lightning callback).

        Args:
            training: Include ``optimizers`` and ``lr_schedulers`` (training and validation
                during fit; not for ``test``).
            metrics: Include the latest step's ``metrics`` (``on_train_batch_end``).
        """
        # A dict display, not TrainerState(...): this runs several times per step.
        state: TrainerState = {
            "current_epoch": self.current_epoch,
            "num_epochs": self.num_epochs,
            "global_step": self.global_step,
            "num_steps": self.num_steps,
            "train_dataloader": self.train_dataloader,
            "num_train_batches": self._num_train_batches,
            "test_dataloader": self._test_dataloader_list,
            "num_test_batches": self._num_test_batches,
            "train_module": self.engine,
            "train_engine": self.engine_name,
            "val_logs": self.val_logs,
            "batches_done": self.batches_done,
        }
        if training:
            state["optimizers"] = self.optimizers
            state["lr_schedulers"] = self.lr_schedulers
        if metrics and self.metrics is not None:
            state["metrics"] = self.metrics
            state["step_end"] = self.step_end
            state["step_skipped"] = self.step_skipped
        return state

    def batch_end_states(self) -> Callable[[], TrainerState]:
        """``state(metrics=True)`` for every ``on_train_batch_end`` of the epoch that starts.

        What an epoch does not change (its loader, the limits, optimizers, schedulers and the
        engine; a new loader takes effect at the next epoch) is read once, here; each call
        copies that and adds the step's position, the latest validation and the metrics.
        The native loop calls it once per micro-batch, where building the whole dict shows.
        """
        template = self.state()

        def make() -> TrainerState:
            state = template.copy()
            state["global_step"] = self.global_step
            state["batches_done"] = self.batches_done
            state["val_logs"] = self.val_logs
            if self.metrics is not None:
                state["metrics"] = self.metrics
                state["step_end"] = self.step_end
                state["step_skipped"] = self.step_skipped
            return state

        return make

    # ------------------------------------------------------------------ epochs and data
    def set_train_dataloader(self, dataloader: DataLoader[Any]) -> None:
        """Hand ``dataloader`` over to the next ``epoch_iterator`` call.

        Raises:
            TypeError: If ``dataloader`` is not a ``DataLoader``.
        """
        if not isinstance(dataloader, DataLoader):
            raise TypeError(
                f"set_train_dataloader needs a DataLoader, got {type(dataloader).__name__}."
            )
        self.pending_train_dataloader = dataloader

    def start_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """Enter ``epoch`` with ``batches_done`` of its batches already trained (a resume)."""
        self.current_epoch = epoch
        self.epoch_finished = False
        self.batches_done = batches_done
        self.metrics = None

    def epoch_iterator(
        self, skip_batches: int = 0, resume_rng: tuple[dict[str, Any], dict[str, Any]] | None = None
    ) -> Iterator[Any]:
        """Start the current epoch's batches the way both engines start them.

        A loader handed over with ``set_train_dataloader`` is adopted first (so one set in
        ``on_train_epoch_start`` serves this whole epoch); then ``sampler.set_epoch``, the
        epoch-start RNG is captured and, on a mid-epoch resume, the epoch's draws are replayed
        and ``skip_batches`` batches dropped (``vistrain.engine.rng.start_epoch_iterator``).
        """
        if self.pending_train_dataloader is not None:
            self._use_train_dataloader(self.pending_train_dataloader)
            self.pending_train_dataloader = None
        if self.train_dataloader is None:
            raise RuntimeError("No training dataloader.")
        iterator, self.epoch_start_rng = start_epoch_iterator(
            self.train_dataloader, self.current_epoch, skip_batches, resume_rng
        )
        return iterator

    def finish_epoch(self) -> None:
        """The epoch end: ``schedulers.step(epoch)``, then every ``on_train_epoch_end``.

        A window still open (a loader without a length, whose last batch was not known as
        such) steps first, so every epoch ends on an optimizer step.
        """
        if self.accumulated:
            self._step_window(self.optimizers)
        for scheduler in self.lr_schedulers:
            scheduler.step(self.current_epoch)
        self.epoch_finished = True
        self.metrics = None
        model = self._require_model()
        loss_module = self.loss_module
        if loss_module is None:
            raise RuntimeError("The epoch end needs the loss module of fit().")
        state = self.state()
        for callback in self.callbacks:
            callback.on_train_epoch_end(state, model, loss_module)

    # ------------------------------------------------------------------ the step
    def use_device(self, device: torch.device) -> None:
        """Train on ``device``: autocast and the fp16 scaler follow its type (before resume)."""
        if device.type != self.stepper.device_type:
            self.stepper = OptimizerStepper(device, *self._step_options)

    def ends_window(self, batches_done: int) -> bool:
        """Whether the batch that makes ``batches_done`` batches of the epoch ends a window.

        Engines ask before the forward, to skip DDP's gradient all-reduce (``no_sync``) on
        micro-batches that do not step.
        """
        accumulate = self.stepper.accumulate_grad_batches
        return (
            accumulate == 1
            or batches_done % accumulate == 0
            or batches_done == self._num_train_batches
        )

    def train_step(
        self,
        total_loss: torch.Tensor,
        metrics: dict[str, Any],
        optimizers: Sequence[Any],
        batches_done: int,
        backward: Callable[[torch.Tensor], None] | None = None,
    ) -> bool:
        """Backward of one micro-batch; at a window's end one step of every optimizer.

        The one place where gradients and optimizer steps happen for both engines (see the
        module docstring for micro-batches and steps). At a window's end: unscale, the
        callbacks' ``on_before_optimizer_step``, clip, step, zero, ``global_step += 1`` (once
        however many optimizers) and, unless fp16 skipped the step, the schedulers'
        ``step_on_batch``. Keeps ``metrics`` for ``on_train_batch_end``. The micro-batch's
        losses go to the non-finite guard (device flags, no sync), and so does a gradient
        norm computed here.

        Args:
            total_loss: The micro-batch's scalar loss (computed under ``stepper.autocast()``).
            metrics: The loss module's metrics (tensors; read lazily as floats).
            optimizers: The optimizers to step (Lightning passes its wrappers of them).
            batches_done: Batches of the epoch done once this one is.
            backward: How to backpropagate (Lightning: ``manual_backward``); None calls
                ``Tensor.backward``.

        Returns:
            Whether this batch ended a window (an optimizer step was taken or skipped).
        """
        if not self.accumulated and not self._zeroed_by_step:
            # Only before the first window of a fit: every window's step ends by zeroing.
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
        stepper = self.stepper
        if backward is None and stepper.plain_backward:
            total_loss.backward()  # nothing to divide or scale: no call in between
        else:
            stepper.backward(total_loss, backward)
        self.batches_done = batches_done
        self.metrics = StepMetrics(metrics)
        watched = metrics["loss"] if self._metrics_hold_total else total_loss.detach()
        self._window_losses.append((watched, metrics, self.current_epoch))
        if self.ends_window(batches_done):
            self._step_window(optimizers)
            return True
        self.accumulated += 1
        self.step_end = False
        return False

    def _step_window(self, optimizers: Sequence[Any]) -> None:
        """Step every optimizer on the window's gradients; count the step."""
        step = self.global_step + 1
        want_norm = self.scalars is not None and (step % self.log_every_n_steps == 0 or step == 1)
        hooked = self._hook_callbacks  # the callbacks with on_before_optimizer_step, cached
        if hooked is None or len(self.callbacks) != self._callback_count:
            hooked = callbacks_overriding(self.callbacks, "on_before_optimizer_step")
            self._hook_callbacks, self._callback_count = hooked, len(self.callbacks)
        hook = self._before_step_hook(optimizers, hooked) if hooked else None
        stepped = self.stepper.step(optimizers, before_step=hook, want_norm=want_norm)
        self._zeroed_by_step = True
        if stepped:
            self.guard.observe_window(self._window_losses, step)
            if self.stepper.grad_norm is not None:
                self.guard.observe_grad_norm(self.stepper.grad_norm, step)
        else:  # stops a run whose every step overflows (max_skipped_steps in a row)
            scale = self.stepper.scaler.get_scale()
            self.guard.observe_skipped_step(step, self.current_epoch, scale)
        self._window_losses.clear()
        self.accumulated = 0
        self.global_step = step
        self.step_end, self.step_skipped = True, not stepped
        if stepped:
            for scheduler in self.lr_schedulers:
                scheduler.step_on_batch(step)

    def _before_step_hook(
        self, optimizers: Sequence[Any], hooked: list[Callback]
    ) -> Callable[[Any], None]:
        """The ``on_before_optimizer_step`` calls of ``hooked`` for ``stepper.step``.

        Callbacks see the run's own optimizer objects, also when Lightning steps wrappers.
        """
        own = {id(wrapper): plain for wrapper, plain in zip(optimizers, self.optimizers)}
        model = self._require_model()
        state = self.state()

        def before_step(optimizer: Any) -> None:
            plain = own.get(id(optimizer), optimizer)
            for callback in hooked:
                callback.on_before_optimizer_step(state, model, plain)

        return before_step

    def request_stop(self, reason: str, exit_code: int = 0, checkpoint: bool = True) -> None:
        """Ask the loop to end at the next step boundary (early stopping, a time budget, ...).

        Any rank, any hook may call it; the first request wins. Nothing happens until the
        next ``stop_requested``, where the ranks agree on it.

        Args:
            reason: What happened, shown to the user (``"early stopping: val/AP did not
                improve for 5 validations"``).
            exit_code: The command line's exit status after the stop (0: a planned end).
            checkpoint: Write a checkpoint at the stop step, so ``--resume`` continues there.
        """
        if self._requested_stop is None:
            self._requested_stop = StopRequest(reason, exit_code, checkpoint)

    @property
    def ending(self) -> bool:
        """Whether the loop ends after this step: step limit or an agreed stop (no collective)."""
        limit_reached = self.num_steps != -1 and self.global_step >= self.num_steps
        return self.stop is not None or limit_reached

    def stop_requested(self) -> bool:
        """The step-boundary check: whether training ends after the step just done.

        Collective when distributed: every rank calls it at the same boundaries (each step,
        and each epoch end in the native loop). A stop requested on any rank (a signal or
        ``request_stop``) is agreed by all; the first time, the checkpoint is written at
        this step and the scalar files flushed before it returns True. The step limit ends
        the loop without either.
        """
        if self.stop is None:
            if self.time_budget.max_seconds is not None:
                self._check_time_budget()
            local = self._requested_stop or received_stop()
            if self._distributed is None:
                self._distributed = is_distributed()
            # Alone, this rank's request is the agreement: a flag test per step, no call.
            stop = agree_on_stop(local) if self._distributed else local
            if stop is not None:
                self._stop_here(stop)
        return self.ending

    def _stop_here(self, stop: StopRequest) -> None:
        """Collective: record the agreed stop, save the checkpoint it asks for, flush scalars."""
        self.stop = stop
        path = None
        if stop.checkpoint:
            model = self._require_model()
            state = self.state()
            for callback in self.callbacks:
                if isinstance(callback, CheckpointCallback):
                    path = callback.save_now(state, model, epoch_finished=self.epoch_finished)
        if self.scalars is not None:
            self.scalars.flush()
        self.stop_report = StopReport(stop, self.current_epoch, self.global_step, path)

    def _check_time_budget(self) -> None:
        """Request a stop when ``max_time`` is spent.

        Collective on log steps and epoch ends when distributed: rank 0's clock decides
        (see ``vistrain.engine.time_budget``).
        """
        budget = self.time_budget
        if budget.max_seconds is None or self._requested_stop is not None:
            return
        sync = self.epoch_finished or self.global_step % self.log_every_n_steps == 0
        if budget.exhausted(sync):
            self.request_stop(f"max_time={budget.max_seconds:g}s spent")

    # ------------------------------------------------------------------ logs
    def open_scalars(self, output_dir: str, resumed: bool) -> None:
        """Open the scalar writers; a resume drops records past its step.

        Called by both engines at the start of fit, after a resume: a fresh run also starts
        its training clock here (a resumed one did in ``resume``).
        """
        if not resumed:
            self.time_budget.start()
        self._distributed = is_distributed()
        self.scalars = ScalarLogger(
            output_dir,
            tensorboard=self.tensorboard,
            purge_after_step=self.global_step if resumed else None,
            loggers=self.loggers,
        )

    def close_scalars(self) -> None:
        """Close the scalar writers (idempotent; also after a failure)."""
        if self.scalars is not None:
            scalars, self.scalars = self.scalars, None
            scalars.close()

    def log_train(self, logs: MetricLogs | None) -> None:
        """Write the callbacks' ``on_train_batch_end`` logs as ``train/<k>`` (``perf/<k>`` as is).

        On log steps (the batch that makes every ``log_every_n_steps``-th step, and the
        first) the learning rates, the epoch, ``train/grad_norm`` (computed on these steps
        only, so other steps need no host sync) and, under fp16, ``train/skipped_steps`` are
        written too.
        """
        step = self.global_step
        log_step = self.step_end and (step % self.log_every_n_steps == 0 or step == 1)
        if log_step:
            self.guard.check()
        if self.scalars is None or not (logs or log_step):
            return
        scalars: dict[str, Any] = {
            key if key.startswith("perf/") else f"train/{key}": value
            for key, value in (logs or {}).items()
        }
        if log_step:
            scalars.update(lr_scalars(self.optimizers))
            scalars["epoch"] = self.current_epoch
            stepper = self.stepper
            if stepper.grad_norm is not None:
                scalars["train/grad_norm"] = stepper.grad_norm
            if stepper.scaler.is_enabled():
                scalars["train/skipped_steps"] = stepper.skipped_steps
        self.scalars.log(scalars, step, self.current_epoch)

    def end_validation(self, logs: MetricLogs) -> None:
        """Keep a validation's ``logs`` and write them as ``val/<k>``; run ``on_validation_end``.

        Every callback's ``on_validation_end`` gets a state whose ``val_logs`` are these.
        """
        self.val_logs = {key: float(value) for key, value in logs.items()}
        log_evaluation_logs("Validation", self.val_logs, self.current_epoch, self.global_step)
        if self.scalars is not None and logs:
            scalars = {f"val/{key}": value for key, value in self.val_logs.items()}
            self.scalars.log(scalars, self.global_step, self.current_epoch)
        model = self._require_model()
        state = self.state()
        for callback in self.callbacks:
            callback.on_validation_end(state, model)

    def write_test_logs(self, logs: MetricLogs, output_dir: str) -> dict[str, float]:
        """Write a test run's logs as ``test/<k>`` and return them as floats."""
        result = {key: float(value) for key, value in logs.items()}
        log_evaluation_logs("Test", result)
        scalars = ScalarLogger(output_dir, tensorboard=self.tensorboard, loggers=self.loggers)
        try:
            scalars.log(
                {f"test/{key}": value for key, value in result.items()},
                self.global_step,
                self.current_epoch,
            )
        finally:
            scalars.close()
        return result

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Collective: the complete training state (see ``resume.collect_checkpoint``).

        Also the training seconds spent so far (``train_time_s``), for ``max_time``.

        Raises:
            NonFiniteError: If a loss became non-finite since the last check (no state of
                poisoned weights is collected).
        """
        self.guard.check()
        return collect_checkpoint(
            self.state(),
            self._require_model(),
            self.callbacks,
            epoch_finished=self.epoch_finished,
            batches_done=self.batches_done,
            epoch_start_rng=self.epoch_start_rng,
            train_time_s=self.time_budget.spent(),
            step_state=self._step_state(),
        )

    def _step_state(self) -> dict[str, Any]:
        """Collective: scaler, skipped steps and, inside a window, every rank's gradients.

        A checkpoint taken inside an accumulation window (a stop request between two steps)
        holds the gradients accumulated so far, so the resumed run continues the window
        bit for bit. Every rank is at the same batch, so all of them gather or none does.
        """
        state = self.stepper.state_dict()
        state["accumulated_batches"] = self.accumulated
        if self.accumulated:
            state["accumulated_grads"] = all_gather_object(accumulated_grads(self.optimizers))
        return state

    def resume(self, ckpt_path: str) -> ResumePoint:
        """Restore everything from ``ckpt_path``; return where the loop starts.

        Raises:
            FileNotFoundError: If the file does not exist.
            CheckpointError: If it is unreadable, foreign or does not fit the model.
            ValueError: If optimizer or scheduler counts differ from the checkpoint's.
        """
        point = restore_checkpoint(
            ckpt_path,
            model=self._require_model(),
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            callbacks=self.callbacks,
            train_dataloader=self.train_dataloader,
        )
        self.global_step = point.global_step
        self.val_logs = point.val_logs
        self.time_budget.start(point.train_time_s)
        self.current_epoch = point.start_epoch
        self._restore_step_state(point.step_state)
        return point

    def _restore_step_state(self, state: dict[str, Any]) -> None:
        """Scaler, skipped steps and an open window's gradients from a checkpoint."""
        self.stepper.load_state_dict(state)
        self.accumulated = int(state.get("accumulated_batches", 0))
        grads = state.get("accumulated_grads")
        if self.accumulated and grads:
            rank = get_rank()
            restore_accumulated_grads(self.optimizers, grads[min(rank, len(grads) - 1)])

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("The training state is only available while fit() runs.")
        return self.model
