"""The engine behind vistrain callbacks when ``lightning.pytorch.Trainer`` runs the loop.

``LightningEngine`` is what ``trainer_state["train_module"]`` is under Lightning: it implements
the ``TrainingEngine`` protocol (``set_train_dataloader``, ``set_check_val_every_n_epoch``,
``checkpoint_state``) and keeps the native loop's bookkeeping that Lightning counts
differently. Lightning hooks map onto the native loop like this::

    Lightning                               vistrain (native order)
    setup                                   callback.setup()
    on_fit_start (module)                   resume from our checkpoint format
    on_train_epoch_start                    on_train_epoch_start
    first next() of the training data       adopt a new loader, sampler.set_epoch,
                                            capture the epoch-start RNG, skip resumed batches
    on_train_batch_start                    on_train_batch_start
    training_step (manual optimization)     forward, loss, backward, step every optimizer,
                                            global_step += 1, schedulers.step_on_batch
    on_train_batch_end (callbacks)          on_train_batch_end -> logs
    on_train_batch_end (module)             logs -> train/<k>; after the epoch's last batch
                                            (epoch-based validation): schedulers.step(epoch),
                                            on_train_epoch_end -- so before Lightning's
                                            validation, as in the native loop
    validation (on_validation_*)            RNG saved; on_test_epoch_start, on_test_batch_end,
                                            on_test_epoch_end -> val/<k>; RNG restored
    on_train_epoch_end                      the epoch end, if not done above (step-based
                                            validation, loaders without a length)
    on_fit_end                              on_fit_end

``global_step`` is the number of training steps, as in the native Trainer; Lightning's own
``trainer.global_step`` counts ``optimizer.step()`` calls and is that times the number of
optimizers under manual optimization.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import LRSchedulerWrapper
from vistrain.engine.rng import capture_rng_state, restore_rng_state
from vistrain.engine.run_state import (
    collect_checkpoint,
    lr_scalars,
    num_batches,
    restore_checkpoint,
    start_epoch_iterator,
)
from vistrain.engine.scalar_log import ScalarLogger
from vistrain.pl.loaders import EpochLoader, LazyLoader

if TYPE_CHECKING:
    import lightning.pytorch as pl

logger = logging.getLogger("vistrain")


class LightningEngine:
    """Loop state and engine API of one ``TrainingModule`` under a Lightning trainer.

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
    ) -> None:
        self.model = model
        self.loss_module = loss_module
        self.optimizers = optimizers
        self.lr_schedulers = lr_schedulers
        self.train_dataloader = train_dataloader
        self.test_dataloaders = test_dataloaders
        self.output_dir = output_dir
        self.log_every_n_steps = log_every_n_steps
        self.tensorboard = tensorboard
        self.trainer: pl.Trainer | None = None

        self.global_step = 0
        self.batches_done = 0
        self.epoch_finished = False
        self.val_logs: dict[str, float] = {}
        self.callbacks: list[Callback] = []
        self.train_loader_proxy = EpochLoader(self)
        self.test_loader_proxies = [LazyLoader(dl) for dl in test_dataloaders]

        self._pending_loader: DataLoader[DictData] | None = None
        self._epoch: int | None = None  # epoch whose bookkeeping is current
        self._epoch_end_done = False
        self._exhausted = False
        self._epoch_start_rng: dict[str, Any] | None = None
        self._skip_batches = 0  # batches of the resumed epoch done before the checkpoint
        self._resume_epoch: int | None = None
        self._resume_rng: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._val_rng: dict[str, Any] | None = None
        self.last_outputs: Any = None
        self._batch_logs: MetricLogs = {}
        self._eval_logs: MetricLogs = {}
        self._scalars: ScalarLogger | None = None
        self._state: TrainerState | None = None
        self._warned_step_val = False

    # ------------------------------------------------------------------ registration
    def attach(self, trainer: pl.Trainer) -> None:
        """Remember the Lightning trainer that runs this engine."""
        self.trainer = trainer

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
    def set_train_dataloader(self, dataloader: DataLoader[Any]) -> None:
        """Train on ``dataloader`` from the next epoch start on (a running epoch is not cut).

        Called from ``on_train_epoch_start``, the new loader already serves that epoch (the
        training iterator starts after the hook); it must then have as many batches as the
        loader it replaces, because Lightning counted the epoch's batches before the hook.
        """
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"Expected a DataLoader, got {type(dataloader).__name__}.")
        if self.train_dataloader is None:
            raise ValueError(
                "set_train_dataloader needs a TrainingModule built with train_dataloader=...; "
                "loaders passed to trainer.fit() directly cannot be replaced."
            )
        self._pending_loader = dataloader

    def set_check_val_every_n_epoch(self, every_n_epochs: int) -> None:
        """Validate every ``every_n_epochs`` epochs from now on (Lightning's setting of that name).

        A step-based run (``val_check_interval`` set, so Lightning's
        ``check_val_every_n_epoch`` is None) keeps validating by step; the call is ignored
        with a warning.
        """
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1.")
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

    def checkpoint_state(self) -> dict[str, Any]:
        """Collective: the complete training state in the native Trainer's format.

        Every rank must call it; rank 0 writes the result (see
        ``vistrain.engine.run_state.collect_checkpoint``).
        """
        return collect_checkpoint(
            trainer_state=self.train_state(),
            model=self.model,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            callbacks=self.callbacks,
            epoch=self.current_epoch,
            epoch_finished=self.epoch_finished,
            batches_done=self.batches_done,
            global_step=self.global_step,
            val_logs=self.val_logs,
            train_dataloader=self.train_dataloader,
            epoch_start_rng=self._epoch_start_rng,
        )

    # ------------------------------------------------------------------ state
    @property
    def current_epoch(self) -> int:
        """Lightning's current epoch (0-based)."""
        return 0 if self.trainer is None else int(self.trainer.current_epoch)

    @property
    def num_epochs(self) -> int:
        """Epoch limit (-1 = none), from ``max_epochs``."""
        max_epochs = None if self.trainer is None else self.trainer.max_epochs
        return -1 if max_epochs is None else int(max_epochs)

    @property
    def num_steps(self) -> int:
        """Training-step limit (-1 = none): Lightning's ``max_steps`` over the optimizers."""
        max_steps = -1 if self.trainer is None else int(self.trainer.max_steps)
        return -1 if max_steps < 0 else max_steps // max(1, len(self.optimizers))

    def _sync_epoch(self) -> None:
        """Reset the per-epoch bookkeeping when Lightning has moved to a new epoch."""
        epoch = self.current_epoch
        if epoch == self._epoch:
            return
        self._epoch = epoch
        self.epoch_finished = False
        self._epoch_end_done = False
        self._exhausted = False
        self.batches_done = self.batch_offset()

    def batch_offset(self) -> int:
        """Batches of the current epoch done before this process started (mid-epoch resume)."""
        return self._skip_batches if self.current_epoch == self._resume_epoch else 0

    def train_state(self, batch_idx: int | None = None, done: bool = False) -> TrainerState:
        """The TrainerState for a training hook, updated in place (one dict per run).

        Args:
            batch_idx: The native batch index when called for a batch hook.
            done: True in ``on_train_batch_end`` (the batch counts as done).
        """
        self._sync_epoch()
        state = self._state
        if state is None:
            state = TrainerState(
                current_epoch=0,
                num_epochs=-1,
                global_step=0,
                num_steps=-1,
                train_dataloader=None,
                num_train_batches=None,
                test_dataloader=None,
                num_test_batches=None,
                train_module=self,
                train_engine="pl",
            )
            self._state = state
        state["current_epoch"] = self.current_epoch
        state["num_epochs"] = self.num_epochs
        state["global_step"] = self.global_step
        state["num_steps"] = self.num_steps
        state["train_dataloader"] = self.train_dataloader
        state["num_train_batches"] = num_batches(self.train_dataloader)
        state["test_dataloader"] = list(self.test_dataloaders) or None
        state["num_test_batches"] = [num_batches(dl) or 0 for dl in self.test_dataloaders] or None
        state["optimizers"] = self.optimizers
        state["lr_schedulers"] = self.lr_schedulers
        state["val_logs"] = self.val_logs
        if batch_idx is not None:
            state["batches_done"] = batch_idx + 1 if done else batch_idx
        else:
            state["batches_done"] = self.batches_done
        return state

    def test_state(self) -> TrainerState:
        """The TrainerState for validation / test hooks."""
        state = self.train_state()
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            state.pop("optimizers", None)
            state.pop("lr_schedulers", None)
        return state

    # ------------------------------------------------------------------ training data
    def epoch_length(self) -> int:
        """Batches the coming epoch yields (the loader's length, less resumed batches)."""
        loader = self._pending_loader or self.train_dataloader
        if loader is None:
            raise RuntimeError("No training dataloader.")
        length = len(loader)
        return max(0, length - self.batch_offset())

    def epoch_batches(self) -> Iterator[Any]:
        """The current epoch's batches, started the way the native loop starts them."""
        self._sync_epoch()
        if self._pending_loader is not None:
            counted = self._trainer().num_training_batches
            new_length = len(self._pending_loader) - self.batch_offset()
            if counted != float("inf") and new_length != counted:
                raise ValueError(
                    f"set_train_dataloader during epoch {self.current_epoch}: the new loader has "
                    f"{new_length} batches but Lightning counted {counted} for this epoch. Under "
                    "Lightning a loader set in on_train_epoch_start must keep the batch count; "
                    "set it in on_train_epoch_end to take effect in the next epoch."
                )
            self.train_dataloader = self._pending_loader
            self._pending_loader = None
        loader = self.train_dataloader
        if loader is None:
            raise RuntimeError("No training dataloader.")
        resume = self._resume_rng if self.current_epoch == self._resume_epoch else None
        self._resume_rng = None
        iterator, self._epoch_start_rng = start_epoch_iterator(
            loader, self.current_epoch, self.batch_offset(), resume
        )
        yield from iterator
        self._exhausted = True

    # ------------------------------------------------------------------ steps and logs
    def after_optimizer_step(self, batch_idx: int, outputs: Any, metrics: dict[str, Any]) -> None:
        """Count the step (native ``global_step``) and advance the step-based schedules.

        ``outputs`` (the model's) are what callbacks see in ``on_train_batch_end``.
        """
        self._sync_epoch()
        self.last_outputs = outputs
        self.global_step += 1
        for scheduler in self.lr_schedulers:
            scheduler.step_on_batch(self.global_step)
        self.batches_done = self.batch_offset() + batch_idx + 1
        if self._state is not None:
            self._state["metrics"] = metrics

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
        Lightning's validation, which is the native order.
        """
        logs, self._batch_logs = self._batch_logs, {}
        self._log_train(logs)
        trainer = self._trainer()
        if trainer.check_val_every_n_epoch is not None and self._epoch_complete():
            self.finish_epoch()

    def _epoch_complete(self) -> bool:
        if self.num_steps != -1 and self.global_step >= self.num_steps:
            return False  # the native loop stops without an epoch end
        if self._exhausted:
            return True
        length = num_batches(self.train_dataloader)
        return length is not None and self.batches_done >= length

    def finish_epoch(self) -> None:
        """The native epoch end, once per epoch.

        ``schedulers.step(epoch)``, then every callback's ``on_train_epoch_end`` in order.
        Skipped for an epoch cut short by the step limit.
        """
        self._sync_epoch()
        if self._epoch_end_done or not self._epoch_complete():
            return
        self._epoch_end_done = True
        for scheduler in self.lr_schedulers:
            scheduler.step(self.current_epoch)
        self.epoch_finished = True
        state = self.train_state()
        for callback in self.callbacks:
            callback.on_train_epoch_end(state, self.model, self.loss_module)

    def _log_train(self, logs: MetricLogs) -> None:
        if self._scalars is None:
            return
        scalars: dict[str, Any] = {f"train/{key}": value for key, value in logs.items()}
        if self.global_step % self.log_every_n_steps == 0 or self.global_step == 1:
            scalars.update(lr_scalars(self.optimizers))
            scalars["epoch"] = self.current_epoch
        if scalars:
            self._scalars.log(scalars, self.global_step, self.current_epoch)

    # ------------------------------------------------------------------ validation
    def start_validation(self) -> None:
        """Save the global RNG states (validation must not change training randomness)."""
        self._val_rng = capture_rng_state()
        self._eval_logs = {}

    def end_validation_epoch(self) -> None:
        """After every callback's ``on_test_epoch_end``: keep and write the val logs."""
        logs, self._eval_logs = self._eval_logs, {}
        self.val_logs = {key: float(value) for key, value in logs.items()}
        if self._scalars is not None and logs:
            self._scalars.log(
                {f"val/{key}": value for key, value in logs.items()},
                self.global_step,
                self.current_epoch,
            )

    def end_validation(self) -> None:
        """Restore the RNG states saved by ``start_validation``."""
        if self._val_rng is not None:
            restore_rng_state(self._val_rng)
            self._val_rng = None

    def end_test_epoch(self, output_dir: str) -> dict[str, float]:
        """After a ``trainer.test`` epoch: write the logs as ``test/<key>`` and return them."""
        logs, self._eval_logs = self._eval_logs, {}
        result = {key: float(value) for key, value in logs.items()}
        scalars = ScalarLogger(output_dir, tensorboard=self.tensorboard)
        try:
            scalars.log(
                {f"test/{key}": value for key, value in result.items()},
                self.global_step,
                self.current_epoch,
            )
        finally:
            scalars.close()
        return result

    # ------------------------------------------------------------------ fit start / end
    def start_fit(self, output_dir: str, ckpt_path: str | None) -> None:
        """Resume from ``ckpt_path`` (our format) if given, then open the scalar writers."""
        if ckpt_path is not None:
            self.resume(ckpt_path)
        self._scalars = ScalarLogger(
            output_dir,
            tensorboard=self.tensorboard,
            purge_after_step=self.global_step if ckpt_path is not None else None,
        )

    def close(self) -> None:
        """Close the scalar writers (idempotent)."""
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None

    def resume(self, ckpt_path: str) -> None:
        """Restore everything from a vistrain checkpoint and move Lightning's loop there.

        Works for epoch-end and mid-epoch checkpoints of either engine. Every check happens
        before any state is changed.

        Raises:
            CheckpointError: If the file is missing, unreadable or does not fit the model.
            ValueError: If optimizer or scheduler counts differ from the checkpoint's.
        """
        point = restore_checkpoint(
            ckpt_path,
            model=self.model,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            callbacks=self.callbacks,
            train_dataloader=self.train_dataloader,
        )
        self.global_step = point.global_step
        self.val_logs = point.val_logs
        start_epoch, self._skip_batches = point.start_epoch, point.skip_batches
        self._resume_rng = point.resume_rng
        self._resume_epoch = start_epoch
        self._set_lightning_position(start_epoch)

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
        steps = self.global_step * max(1, len(self.optimizers))
        optim_total = epoch_loop.manual_optimization.optim_step_progress.total
        optim_total.ready = optim_total.completed = steps
        batch_total: Any = epoch_loop.batch_progress.total
        batch_total.ready = batch_total.started = self.global_step
        batch_total.processed = batch_total.completed = self.global_step
        epoch_loop._batches_that_stepped = self.global_step
        self._epoch = None


__all__ = ["LightningEngine"]
