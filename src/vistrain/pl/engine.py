"""The engine behind vistrain callbacks when ``lightning.pytorch.Trainer`` runs the loop.

``LightningEngine`` is what ``trainer_state["train_module"]`` is under Lightning: it implements
the ``TrainingEngine`` protocol (``set_train_dataloader``, ``set_check_val_every_n_epoch``,
``checkpoint_state``). The bookkeeping is the native engine's own
(``vistrain.engine.loop_state.LoopState``); this module holds only the mapping of Lightning's
hooks onto the native loop::

    Lightning                               vistrain (native order)
    setup                                   callback.setup()
    on_fit_start (module)                   resume from our checkpoint format
    on_train_epoch_start                    on_train_epoch_start
    first next() of the training data       adopt a new loader, sampler.set_epoch,
                                            capture the epoch-start RNG, skip resumed batches
    on_train_batch_start                    on_train_batch_start
    on_train_batch_start (module)           DDP no_sync inside an accumulation window
    training_step (manual optimization)     forward, loss under autocast;
                                            LoopState.train_step: backward (divided, scaled);
                                            at a window's end unscale, on_before_optimizer_step,
                                            clip, step every optimizer, global_step += 1,
                                            schedulers.step_on_batch
    on_train_batch_end (callbacks)          on_train_batch_end -> logs
    on_train_batch_end (module)             logs -> train/<k>; stop_requested() (a stop:
                                            checkpoint, trainer.should_stop, no validation);
                                            after the epoch's last batch
                                            (epoch-based validation): schedulers.step(epoch),
                                            on_train_epoch_end -- so before Lightning's
                                            validation, as in the native loop
    epoch loop: validate now?               by epoch: Lightning; by step (an int
                                            val_check_interval): after a batch that ended a
                                            window when the interval divides global_step
    validation (on_validation_*)            RNG saved; on_test_epoch_start, on_test_batch_end,
                                            on_test_epoch_end -> val/<k>, on_validation_end;
                                            RNG restored
    on_train_epoch_end                      the epoch end, if not done above (step-based
                                            validation, loaders without a length)
    on_fit_end                              on_fit_end

Signals: SIGTERM, SIGINT and SIGUSR1 request a stop as in the native engine
(``vistrain.engine.stop_signal``). Lightning installs its own SIGTERM handler when the fit
starts (it broadcasts from inside the handler); ours is put back at ``on_train_start``.

``global_step`` is the number of training steps, as in the native Trainer; Lightning's own
``trainer.global_step`` counts ``optimizer.step()`` calls and is that times the number of
optimizers under manual optimization.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.common.checks import check_positive_int
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.loop_state import LoopState, check_trains_some_steps, num_batches
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import LRSchedulerWrapper
from vistrain.engine.rng import capture_rng_state, restore_rng_state
from vistrain.engine.stop_signal import StopSignals
from vistrain.pl.loaders import EpochLoader, LazyLoader

if TYPE_CHECKING:
    import lightning.pytorch as pl

logger = logging.getLogger("vistrain")


class LightningEngine:
    """The engine API and hook mapping of one ``TrainingModule`` under a Lightning trainer.

    Created by ``TrainingModule``; ``CallbackWrapper`` instances register themselves at
    ``setup`` so the engine can run collective work (checkpoint state, the epoch end) over
    every vistrain callback in the order Lightning calls them.

    Args:
        model: The bare vistrain model (what callbacks receive and checkpoints store).
        loss_module: The training loss module.
        optimizers: The optimizers, stepped by the module once per training step each.
        lr_schedulers: Scheduler wrappers: ``step_on_batch`` per step, ``step`` per epoch.
        train_dataloader: Training data (None for a test-only module).
        test_dataloaders: Validation / test loaders.
        output_dir: Folder of ``metrics.jsonl`` / TensorBoard files (None: the trainer's
            ``default_root_dir``).
        log_every_n_steps: Write learning rates every n steps (train logs are written
            whenever callbacks return them).
        tensorboard: Also write TensorBoard event files.
        max_time: Training-time budget in seconds (None = none).
        loggers: Scalar writer names (None = the default).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (``LoopState``).
        accumulate_grad_batches: Batches per optimizer step.
        gradient_clip_val: Clip threshold (None: never).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_module: LossModule,
        optimizers: list[Optimizer],
        lr_schedulers: list[LRSchedulerWrapper],
        train_dataloader: DataLoader[DictData] | None,
        test_dataloaders: list[DataLoader[DictData]],
        output_dir: str | None,
        log_every_n_steps: int,
        tensorboard: bool,
        max_time: float | None = None,
        loggers: list[str] | None = None,
        precision: str = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        self.model = model
        self.loss_module = loss_module
        self.output_dir = output_dir
        self.trainer: pl.Trainer | None = None
        self.callbacks: list[Callback] = []
        self.loop = LoopState(
            engine=self,
            engine_name="pl",
            callbacks=self.callbacks,
            optimizers=optimizers,
            lr_schedulers=lr_schedulers,
            train_dataloader=train_dataloader,
            test_dataloaders=test_dataloaders,
            loss_module=loss_module,
            num_epochs=-1,
            num_steps=-1,
            log_every_n_steps=log_every_n_steps,
            tensorboard=tensorboard,
            max_time=max_time,
            loggers=loggers,
            precision=precision,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )
        self.loop.model = model
        self._no_sync = contextlib.ExitStack()
        self.train_loader_proxy = EpochLoader(self)
        self.test_loader_proxies = [LazyLoader(dl) for dl in test_dataloaders]

        self._epoch: int | None = None  # epoch whose bookkeeping is current
        self._epoch_end_done = False
        self._exhausted = False
        self._skip_batches = 0  # batches of the resumed epoch done before the checkpoint
        self._resume_epoch: int | None = None
        self._resume_rng: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._val_rng: dict[str, Any] | None = None
        self.last_outputs: Any = None
        self._batch_logs: MetricLogs = {}
        self._eval_logs: MetricLogs = {}
        self._warned_step_val = False
        self._signals = StopSignals()

    # ------------------------------------------------------------------ registration
    def attach(self, trainer: pl.Trainer) -> None:
        """Remember the Lightning trainer that runs this engine; take its limits.

        A step-based ``val_check_interval`` counts optimizer steps from here on (see
        ``_validate_by_step``).
        """
        self.trainer = trainer
        self._validate_by_step(trainer)
        self.loop.use_device(trainer.strategy.root_device)
        max_epochs = trainer.max_epochs
        self.loop.num_epochs = -1 if max_epochs is None else int(max_epochs)
        max_steps = int(trainer.max_steps)
        # Lightning counts optimizer.step() calls: num_steps times the optimizers.
        self.loop.num_steps = -1 if max_steps < 0 else max_steps // max(1, len(self.optimizers))

    def _validate_by_step(self, trainer: pl.Trainer) -> None:
        """Make an int ``val_check_interval`` count optimizer steps, as the native Trainer does.

        Lightning counts it in batches. Under accumulation that is not a fixed multiple of
        the steps (the last, partial window of an epoch steps too), and a validation inside
        a window would zero its gradients (Lightning's ``on_validation_model_zero_grad``).
        So with step-based validation (``check_val_every_n_epoch=None``) the epoch loop asks
        this engine instead: validate after a batch that ended a window when the interval
        divides ``global_step``. Lightning has no public hook for that decision; its epoch
        loop's ``_should_check_val_fx`` (Lightning 2.x) is replaced on this trainer only, and
        Lightning still decides when it is stopping.
        """
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop.__dict__.pop("_should_check_val_fx", None)  # an earlier attach's
        interval = trainer.val_check_interval
        if trainer.check_val_every_n_epoch is not None or not isinstance(interval, int):
            return
        lightning_decides = getattr(epoch_loop, "_should_check_val_fx", None)
        if lightning_decides is None or not hasattr(epoch_loop, "_should_check_val_epoch"):
            import lightning

            raise RuntimeError(
                f"step-based validation (val_check_interval={interval}) needs the epoch loop "
                f"of Lightning 2.x, which this Lightning ({lightning.__version__}) lacks; install "
                "lightning>=2.2,<3, or validate by epoch (check_val_every_n_epoch)"
            )
        loop = self.loop

        def should_validate(data_fetcher: Any) -> bool:
            if trainer.should_stop or not epoch_loop._should_check_val_epoch():
                return bool(lightning_decides(data_fetcher))
            return loop.step_end and loop.global_step % interval == 0

        epoch_loop._should_check_val_fx = should_validate  # type: ignore[method-assign]

    def register(self, callback: Callback) -> None:
        """Add a vistrain callback (in Lightning's hook order); a repeated one is ignored."""
        if not any(existing is callback for existing in self.callbacks):
            self.callbacks.append(callback)

    def _trainer(self) -> pl.Trainer:
        if self.trainer is None:
            raise RuntimeError(
                "The Lightning engine is not attached to a trainer; run the TrainingModule with "
                "lightning.pytorch.Trainer.fit/test."
            )
        return self.trainer

    # ------------------------------------------------------------------ engine API
    @property
    def optimizers(self) -> list[Optimizer]:
        """The vistrain optimizers."""
        return self.loop.optimizers

    @property
    def train_dataloader(self) -> DataLoader[DictData] | None:
        """The loader the current (or next) epoch trains on."""
        return self.loop.train_dataloader

    @property
    def global_step(self) -> int:
        """Training steps done (the native count; see the module docstring)."""
        return self.loop.global_step

    def set_train_dataloader(self, dataloader: DataLoader[Any]) -> None:
        """Train on ``dataloader`` from the next epoch start on (a running epoch is not cut).

        Called from ``on_train_epoch_start``, the new loader already serves that epoch (the
        training iterator starts after the hook); it must then have as many batches as the
        loader it replaces, because Lightning counted the epoch's batches before the hook.
        """
        if self.loop.train_dataloader is None:
            raise ValueError(
                "set_train_dataloader needs a TrainingModule built with train_dataloader=...; "
                "loaders passed to trainer.fit() directly cannot be replaced."
            )
        self.loop.set_train_dataloader(dataloader)

    def set_check_val_every_n_epoch(self, every_n_epochs: int) -> None:
        """Validate every ``every_n_epochs`` epochs from now on (Lightning's setting of that name).

        A step-based run (``val_check_interval`` set, so Lightning's
        ``check_val_every_n_epoch`` is None) keeps validating by step; the call is ignored
        with a warning.
        """
        check_positive_int("every_n_epochs", every_n_epochs)
        trainer = self._trainer()
        if trainer.check_val_every_n_epoch is None:
            if not self._warned_step_val:
                self._warned_step_val = True
                logger.warning(
                    "set_check_val_every_n_epoch(%d) ignored: this Lightning run validates every "
                    "val_check_interval steps.",
                    every_n_epochs,
                )
            return
        trainer.check_val_every_n_epoch = every_n_epochs

    def request_stop(self, reason: str, exit_code: int = 0, checkpoint: bool = True) -> None:
        """End training at the next step boundary (see ``LoopState.request_stop``)."""
        self.loop.request_stop(reason, exit_code, checkpoint)

    def checkpoint_state(self) -> dict[str, Any]:
        """Collective: the complete training state in the native Trainer's format.

        Every rank must call it; rank 0 writes the result (see
        ``vistrain.engine.resume.collect_checkpoint``).
        """
        self._sync_epoch()
        return self.loop.checkpoint_state()

    # ------------------------------------------------------------------ state
    def _sync_epoch(self) -> None:
        """Enter Lightning's current epoch in the shared bookkeeping when it has moved on."""
        epoch = 0 if self.trainer is None else int(self.trainer.current_epoch)
        if epoch == self._epoch:
            return
        self._epoch = epoch
        self._epoch_end_done = False
        self._exhausted = False
        self.loop.start_epoch(epoch, self._offset(epoch))

    def _offset(self, epoch: int) -> int:
        return self._skip_batches if epoch == self._resume_epoch else 0

    def batch_offset(self) -> int:
        """Batches of the current epoch done before this process started (mid-epoch resume)."""
        self._sync_epoch()
        return self._offset(self.loop.current_epoch)

    def train_state(self, metrics: bool = False) -> TrainerState:
        """A fresh TrainerState for a training hook (``metrics``: for ``on_train_batch_end``)."""
        self._sync_epoch()
        return self.loop.state(metrics=metrics)

    def test_state(self) -> TrainerState:
        """A fresh TrainerState for validation / test hooks."""
        self._sync_epoch()
        trainer = self.trainer
        return self.loop.state(training=trainer is not None and trainer.state.fn == "fit")

    # ------------------------------------------------------------------ training data
    def epoch_length(self) -> int:
        """Batches the coming epoch yields (the loader's length, less resumed batches)."""
        loader = self.loop.pending_train_dataloader or self.loop.train_dataloader
        if loader is None:
            raise RuntimeError("No training dataloader.")
        return max(0, len(loader) - self.batch_offset())

    def epoch_batches(self) -> Iterator[Any]:
        """The current epoch's batches, started the way the native loop starts them."""
        offset = self.batch_offset()
        pending = self.loop.pending_train_dataloader
        if pending is not None:
            counted = self._trainer().num_training_batches
            new_length = len(pending) - offset
            if counted != float("inf") and new_length != counted:
                raise ValueError(
                    f"set_train_dataloader during epoch {self.loop.current_epoch}: the new loader "
                    f"has {new_length} batches but Lightning counted {counted} for this epoch. "
                    "Under Lightning a loader set in on_train_epoch_start must keep the batch "
                    "count; set it in on_train_epoch_end to take effect in the next epoch."
                )
        resume = self._resume_rng if self.loop.current_epoch == self._resume_epoch else None
        self._resume_rng = None
        yield from self.loop.epoch_iterator(offset, resume)
        self._exhausted = True

    # ------------------------------------------------------------------ steps and logs
    def train_step(
        self,
        batch_idx: int,
        total_loss: torch.Tensor,
        metrics: dict[str, Any],
        outputs: Any,
        optimizers: list[Any],
        backward: Any,
    ) -> None:
        """The shared step (``LoopState.train_step``) with Lightning's optimizers and backward.

        ``outputs`` (the model's) are what callbacks see in ``on_train_batch_end``.
        """
        self.last_outputs = outputs
        done = self.batch_offset() + batch_idx + 1
        stepped = self.loop.train_step(total_loss, metrics, optimizers, done, backward)
        if stepped and self.loop.step_skipped:
            self._count_skipped_step()

    def _count_skipped_step(self) -> None:
        """Count a step the fp16 scaler skipped as Lightning's optimizer steps.

        Lightning's ``global_step`` (and so ``max_steps``) counts ``optimizer.step()`` calls,
        which the scaler does not make for a skipped step; the shared loop counts it, so the
        progress tracker ``_set_lightning_position`` also sets is advanced by hand.
        """
        epoch_loop = self._trainer().fit_loop.epoch_loop
        progress = epoch_loop.manual_optimization.optim_step_progress
        for _ in self.optimizers:
            progress.increment_ready()
            progress.increment_completed()

    def enter_no_sync(self, wrapped_model: Any, batch_idx: int) -> None:
        """Enter DDP's ``no_sync`` when batch ``batch_idx`` does not end a window."""
        if (
            self.loop.stepper.accumulate_grad_batches > 1
            and isinstance(wrapped_model, nn.parallel.DistributedDataParallel)
            and not self.loop.ends_window(self.batch_offset() + batch_idx + 1)
        ):
            self._no_sync.enter_context(wrapped_model.no_sync())

    def leave_no_sync(self) -> None:
        """Leave a ``no_sync`` entered by ``enter_no_sync`` (no-op otherwise)."""
        self._no_sync.close()

    def add_train_logs(self, logs: MetricLogs | None) -> None:
        """Collect logs a callback returned from ``on_train_batch_end``."""
        if logs:
            self._batch_logs.update(logs)

    def add_eval_logs(self, logs: MetricLogs | None) -> None:
        """Collect logs a callback returned from ``on_test_epoch_end``."""
        if logs:
            self._eval_logs.update(logs)

    def after_train_batch(self) -> None:
        """After every callback's ``on_train_batch_end``: write logs; maybe end the epoch.

        With epoch-based validation the epoch ends here, after its last batch and before
        Lightning's validation, which is the native order. The step limit is Lightning's
        ``max_steps``; a stop request from ``LoopState.stop_requested`` is Lightning's
        ``trainer.should_stop`` at this point.
        """
        logs, self._batch_logs = self._batch_logs, {}
        self.loop.log_train(logs)
        trainer = self._trainer()
        if self.loop.stop_requested() and self.loop.stop is not None:
            # Lightning validates when should_stop is set; the native loop does not.
            trainer.should_stop = True
            trainer.limit_val_batches = 0
        if trainer.check_val_every_n_epoch is not None and self._epoch_complete():
            self.finish_epoch()

    def _epoch_complete(self) -> bool:
        if self.loop.ending:
            return False  # the native loop stops without an epoch end
        if self._exhausted:
            return True
        length = num_batches(self.loop.train_dataloader)
        return length is not None and self.loop.batches_done >= length

    def finish_epoch(self) -> None:
        """The native epoch end (``LoopState.finish_epoch``), once per epoch.

        Skipped for an epoch cut short by the step limit.
        """
        self._sync_epoch()
        if self._epoch_end_done or not self._epoch_complete():
            return
        self._epoch_end_done = True
        self.loop.finish_epoch()

    # ------------------------------------------------------------------ validation
    def start_validation(self) -> None:
        """Save the global RNG states (validation must not change training randomness)."""
        self._val_rng = capture_rng_state()
        self._eval_logs = {}

    def end_validation_epoch(self) -> None:
        """After every callback's ``on_test_epoch_end``: the shared validation end.

        Keeps and writes the val logs, then runs the callbacks' ``on_validation_end``.
        """
        logs, self._eval_logs = self._eval_logs, {}
        self._sync_epoch()
        self.loop.end_validation(logs)
        if self.loop.stop_requested() and self.loop.stop is not None:
            self._trainer().should_stop = True  # e.g. early stopping: leave after this validation

    def end_validation(self) -> None:
        """Restore the RNG states saved by ``start_validation``."""
        if self._val_rng is not None:
            restore_rng_state(self._val_rng)
            self._val_rng = None

    def end_test_epoch(self, output_dir: str) -> dict[str, float]:
        """After a ``trainer.test`` epoch: write the logs as ``test/<key>`` and return them."""
        logs, self._eval_logs = self._eval_logs, {}
        return self.loop.write_test_logs(logs, output_dir)

    # ------------------------------------------------------------------ fit start / end
    def start_fit(self, output_dir: str, ckpt_path: str | None) -> None:
        """Resume from ``ckpt_path`` (our format) if given, then open the scalar writers.

        Raises:
            ValueError: If the training data yields no batch (``check_trains_some_steps``).
        """
        check_trains_some_steps(self.loop.train_dataloader)
        self._signals.install()
        if ckpt_path is not None:
            self.resume(ckpt_path)
        self.loop.open_scalars(output_dir, resumed=ckpt_path is not None)

    def start_training(self) -> None:
        """At ``on_train_start``: put the stop-signal handlers back over Lightning's."""
        self._signals.install()

    def close(self) -> None:
        """Restore the signal handlers and close the scalar writers (idempotent)."""
        self._signals.uninstall()
        self.loop.close_scalars()

    def resume(self, ckpt_path: str) -> None:
        """Restore everything from a vistrain checkpoint and move Lightning's loop there.

        Works for epoch-end and mid-epoch checkpoints of either engine. Every check happens
        before any state is changed.

        Raises:
            CheckpointError: If the file is missing, unreadable or does not fit the model.
            ValueError: If optimizer or scheduler counts differ from the checkpoint's.
        """
        point = self.loop.resume(ckpt_path)
        self._skip_batches = point.skip_batches
        self._resume_rng = point.resume_rng
        self._resume_epoch = point.start_epoch
        self._set_lightning_position(point.start_epoch)

    def _set_lightning_position(self, start_epoch: int) -> None:
        """Make Lightning's loop counters say: ``start_epoch`` starts, ``global_step`` done.

        Lightning has no public API to start at a position without its own checkpoint
        format, so the progress trackers its loops read are set directly (Lightning 2.x).
        """
        fit_loop = self._trainer().fit_loop
        tracker: Any
        for tracker in (fit_loop.epoch_progress.current, fit_loop.epoch_progress.total):
            tracker.ready = tracker.started = tracker.processed = tracker.completed = start_epoch
        epoch_loop = fit_loop.epoch_loop
        global_step = self.loop.global_step
        steps = global_step * max(1, len(self.optimizers))
        optim_total = epoch_loop.manual_optimization.optim_step_progress.total
        optim_total.ready = optim_total.completed = steps
        # Lightning's batch count (its step-based validation now asks the engine,
        # ``_validate_by_step``): accumulate_grad_batches per step, plus an open window's.
        batches = global_step * self.loop.stepper.accumulate_grad_batches + self.loop.accumulated
        batch_total: Any = epoch_loop.batch_progress.total
        batch_total.ready = batch_total.started = batches
        batch_total.processed = batch_total.completed = batches
        epoch_loop._batches_that_stepped = global_step
        self._epoch = None


__all__ = ["LightningEngine"]
