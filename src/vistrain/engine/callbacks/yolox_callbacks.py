"""YOLOX-specific callbacks: the late mode switch, norm-statistics sync and multi-scale training.

Where they sit in the loop::

    for epoch in epochs:
        ModeSwitch.on_train_epoch_start   # resumed past switch_epoch? switch before step one
        for batch in train_loader:
            RandomResize.on_train_batch_start   # every `interval` optimizer steps rank 0 draws
                                                # a size at the step's first micro-batch; every
                                                # batch is resized to the current size
            forward, loss, backward, step
        ModeSwitch.on_train_epoch_end     # end of epoch switch_epoch - 1: drop mosaic/mixup,
                                          # turn the L1 term on, validate every epoch
        SyncNorm.on_test_epoch_start      # average norm statistics across ranks, then evaluate
    SyncNorm.on_save_checkpoint           # same average before the state is saved

All three stay correct under resume: the mode follows from the epoch, the resize size and
its random generator are callback state, and the norm sync is a pure function of the model.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from torch import nn

from vistrain.common.distributed import broadcast, is_rank_zero
from vistrain.common.typing import DictData
from vistrain.data.loader import rebuild_dataloader
from vistrain.data.pipe import strip_multi_sample
from vistrain.data.transforms.batch_resize import resize_view
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState, TrainingEngine
from vistrain.engine.loss_module import LossModule
from vistrain.op.detect.yolox import L1SwitchableLoss
from vistrain.op.norm import all_reduce_norm

logger = logging.getLogger(__name__)

__all__ = [
    "YOLOXModeSwitchCallback",
    "YOLOXSyncNormCallback",
    "YOLOXSyncRandomResizeCallback",
]


# --------------------------------------------------------------------------------------------
# Mode switch
# --------------------------------------------------------------------------------------------


class YOLOXModeSwitchCallback(Callback):
    """Switch YOLOX training to its final, "no augmentation" mode.

    At the end of epoch ``switch_epoch - 1`` (0-based), so that epochs ``switch_epoch`` and
    later run in the new mode, it:

    1. rebuilds the training DataLoader over ``dataset.without_multi_sample()`` (a
       ``vistrain.data.pipe.MultiSamplePipe``, also inside ``Subset``/``ConcatDataset``: mosaic,
       mixup and their affine dropped; every loader setting kept) and hands it to the engine
       with ``train_module.set_train_dataloader``;
    2. calls ``enable_l1_loss()`` on each loss of the loss module that follows
       ``vistrain.op.detect.yolox.L1SwitchableLoss`` (``YOLOXHeadLoss`` does);
    3. sets validation to every epoch with ``train_module.set_check_val_every_n_epoch(1)``.

    Beyond the reference, the mode follows from the epoch: if an epoch starts at or after
    ``switch_epoch`` and the switch has not happened in this process (a resumed run, or
    ``switch_epoch=0``: the whole run in the final mode), it switches in
    ``on_train_epoch_start``, before the first step. The engine is expected to train the
    current epoch on a loader set during ``on_train_epoch_start``. Switching is idempotent.

    A ``switch_epoch`` at or past the end of the run (``>= trainer_state["num_epochs"]``)
    means the run never switches: a warning says so at the first epoch, as vis4d does,
    rather than an error, so a short trial run (``num_epochs=1``) of a long recipe works.
    A resumed run with more epochs switches once it reaches ``switch_epoch``.

    Args:
        *args: Passed to ``Callback``.
        switch_epoch: Number of epochs trained in the strong-augmentation mode (>= 0).
        **kwargs: Passed to ``Callback``.

    Raises:
        ValueError: If ``switch_epoch`` is negative.
        TypeError: If ``switch_epoch`` is not an int.
    """

    def __init__(self, *args: Any, switch_epoch: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(switch_epoch, bool) or not isinstance(switch_epoch, int):
            raise TypeError(
                f"switch_epoch must be an int, got {type(switch_epoch).__name__} {switch_epoch!r}."
            )
        if switch_epoch < 0:
            raise ValueError(
                f"switch_epoch={switch_epoch} is invalid; it is the number of epochs trained with "
                "strong augmentation before the switch, so it must be >= 0."
            )
        self.switch_epoch = switch_epoch
        self.switched = False
        self._warned_never = False

    def _never_switches(self, trainer_state: TrainerState) -> bool:
        """Whether ``switch_epoch`` lies at or past the run's last epoch."""
        num_epochs = trainer_state.get("num_epochs", -1)
        return num_epochs >= 0 and self.switch_epoch >= num_epochs

    def on_train_epoch_start(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """Switch before the first step when the run starts (resumes) past ``switch_epoch``.

        Warns once instead when the run ends before ``switch_epoch``.
        """
        if self._never_switches(trainer_state):
            if not self._warned_never and is_rank_zero():
                logger.warning(
                    "YOLOXModeSwitchCallback: switch_epoch=%d is at or past the end of the run "
                    "(num_epochs=%d), so this run never switches (the multi-sample "
                    "augmentation stays on, no L1 term). Lower switch_epoch to switch.",
                    self.switch_epoch,
                    trainer_state["num_epochs"],
                )
            self._warned_never = True
            return
        if not self.switched and trainer_state["current_epoch"] >= self.switch_epoch:
            self.switch(trainer_state, loss_module)

    def on_train_epoch_end(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """Switch at the end of epoch ``switch_epoch - 1`` (not after the run's last epoch)."""
        if self.switched or self._never_switches(trainer_state):
            return
        if trainer_state["current_epoch"] >= self.switch_epoch - 1:
            self.switch(trainer_state, loss_module)

    def switch(self, trainer_state: TrainerState, loss_module: LossModule | None) -> None:
        """Do the switch now (data, loss, validation interval); a no-op once done.

        Raises:
            ValueError: If the trainer state carries no ``train_module`` to hand changes to.
        """
        if self.switched:
            return
        engine = trainer_state.get("train_module")
        if engine is None:
            raise ValueError(
                "YOLOXModeSwitchCallback needs trainer_state['train_module'] (the engine with "
                "set_train_dataloader / set_check_val_every_n_epoch); run it under the vistrain "
                "Trainer or the Lightning bridge."
            )
        epoch = trainer_state["current_epoch"]
        self._switch_data(trainer_state, engine)
        self._switch_loss(loss_module)
        engine.set_check_val_every_n_epoch(1)
        self.switched = True
        if is_rank_zero():
            logger.info(
                "YOLOX mode switch at epoch %d: no multi-sample augmentation, L1 loss on, "
                "validation every epoch.",
                epoch,
            )

    @staticmethod
    def _switch_data(trainer_state: TrainerState, engine: TrainingEngine) -> None:
        loader = trainer_state.get("train_dataloader")
        if loader is None:
            if is_rank_zero():
                logger.warning(
                    "YOLOXModeSwitchCallback: no train_dataloader in the trainer state; the "
                    "training data keeps its augmentations."
                )
            return
        dataset, changed = strip_multi_sample(loader.dataset)
        if not changed:
            if is_rank_zero():
                logger.warning(
                    "YOLOXModeSwitchCallback: the training dataset (%s) has no multi-sample "
                    "stage (no MultiSampleDataPipe with has_multi_sample=True, directly or in "
                    "a Subset/ConcatDataset); the training data is left unchanged.",
                    type(loader.dataset).__name__,
                )
            return
        engine.set_train_dataloader(rebuild_dataloader(loader, dataset))

    @staticmethod
    def _switch_loss(loss_module: LossModule | None) -> None:
        losses: list[L1SwitchableLoss] = (
            [] if loss_module is None else loss_module.find_loss(L1SwitchableLoss)
        )
        if not losses:
            if is_rank_zero():
                logger.warning(
                    "YOLOXModeSwitchCallback: no YOLOXHeadLoss (a loss with enable_l1_loss) in "
                    "the loss module; the L1 term stays off."
                )
            return
        for loss in losses:
            loss.enable_l1_loss()


# --------------------------------------------------------------------------------------------
# Norm statistics sync
# --------------------------------------------------------------------------------------------


class YOLOXSyncNormCallback(Callback):
    """Average normalisation statistics across ranks before evaluation and checkpoints.

    Each rank's BatchNorm running statistics drift apart under DDP (every rank sees other
    images); YOLOX evaluates and saves their mean. ``on_test_epoch_start`` (before every
    validation/test epoch) and ``on_save_checkpoint`` (a collective hook the engine calls
    before collecting the state to save, so saved statistics equal evaluated ones) both run
    ``all_reduce_norm`` on the model. On one process both do nothing and log nothing.

    Args:
        epoch_based: Whether the callback counts in epochs.
        train_connector: Unused; kept for the common callback signature.
        test_connector: Unused; kept for the common callback signature.
    """

    def on_test_epoch_start(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Collective: average norm states across ranks before testing."""
        all_reduce_norm(model)

    def on_save_checkpoint(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Collective: average norm states across ranks before the state is saved."""
        all_reduce_norm(model)


# --------------------------------------------------------------------------------------------
# Synchronised random resize
# --------------------------------------------------------------------------------------------


def _parse_size_list(size_list: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(size_list, (str, bytes)) or not isinstance(size_list, Sequence):
        raise TypeError(f"size_list must be a list of (h, w) tuples, got {size_list!r}.")
    if len(size_list) == 0:
        raise ValueError("size_list is empty; give at least one (h, w) size, e.g. [(640, 640)].")
    sizes: list[tuple[int, int]] = []
    for size in size_list:
        if (
            not isinstance(size, Sequence)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ValueError(
                f"size_list entry {size!r} is invalid; each entry must be a (h, w) pair of "
                "positive ints."
            )
        sizes.append((int(size[0]), int(size[1])))
    return sizes


class YOLOXSyncRandomResizeCallback(Callback):
    """Multi-scale training: resize every training batch to a size drawn every few steps.

    In ``on_train_batch_start``, when ``(global_step + 1) % interval == 0``, a size is drawn
    from ``size_list`` with ``random.choice`` on the callback's own seeded generator, and
    rank 0's draw is broadcast so every rank trains at the same size (every rank draws, so
    the generators stay equal on all ranks). Then, every batch, the images of each view
    (a dict batch, or each dict of a list batch) are resized in place to the current size,
    ``input_hw`` and ``boxes2d`` scaled to match. Before the first draw the size is the last
    entry of ``size_list``.

    ``interval`` counts optimizer steps (``global_step``). Under gradient accumulation the
    batch hooks run for every micro-batch while ``global_step`` stays put, so the draw for a
    step happens once, at its first micro-batch: all micro-batches of a window share one
    input size and the size changes only between optimizer steps. The current size, the
    generator state and the step of the last draw are the callback state, so a resumed run
    (also one stopped inside a window) draws exactly the sizes an uninterrupted one would.

    Args:
        *args: Passed to ``Callback``.
        size_list: Candidate ``(h, w)`` sizes.
        interval: Draw a new size every ``interval`` steps (>= 1).
        seed: Seed of the callback's generator (beyond the reference; default 0).
        **kwargs: Passed to ``Callback``.

    Raises:
        ValueError: If ``size_list`` is empty or has an entry that is not two positive ints,
            or if ``interval`` is below 1.
    """

    def __init__(
        self,
        *args: Any,
        size_list: Sequence[Sequence[int]],
        interval: int,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.size_list = _parse_size_list(size_list)
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise TypeError(f"interval must be an int, got {type(interval).__name__} {interval!r}.")
        if interval < 1:
            raise ValueError(f"interval={interval} is invalid; draw every interval >= 1 steps.")
        self.interval = interval
        self._rng = random.Random(seed)
        self.size: tuple[int, int] = self.size_list[-1]
        self._drawn_for_step: int | None = None  # global_step of the last draw

    def on_train_batch_start(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        batch: DictData,
        batch_idx: int,
    ) -> None:
        """Collective every ``interval`` steps: maybe draw a size, then resize the batch."""
        step = trainer_state["global_step"]
        if (step + 1) % self.interval == 0 and step != self._drawn_for_step:
            self._drawn_for_step = step  # the window's later micro-batches keep this size
            drawn = self._rng.choice(self.size_list)
            self.size = tuple(broadcast(drawn, src=0))  # type: ignore[assignment]
        views = batch if isinstance(batch, list) else [batch]
        for view in views:
            resize_view(view, self.size)

    def state_dict(self) -> dict[str, Any]:
        """Current size, generator state and step of the last draw (plain lists and numbers)."""
        version, internal, gauss_next = self._rng.getstate()
        return {
            "size": list(self.size),
            "drawn_for_step": self._drawn_for_step,
            "rng_version": version,
            "rng_internal": list(internal),
            "rng_gauss_next": gauss_next,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the size, generator and last draw's step saved by ``state_dict``.

        A state from before ``drawn_for_step`` was saved (no such key) loads as "no draw
        yet in this step".

        Raises:
            ValueError: If the state lacks a key or its size is not a (h, w) pair.
        """
        missing = {"size", "rng_version", "rng_internal", "rng_gauss_next"} - set(state_dict)
        if missing:
            raise ValueError(
                f"YOLOXSyncRandomResizeCallback state is missing {sorted(missing)}; pass a dict "
                "made by its state_dict()."
            )
        (self.size,) = _parse_size_list([tuple(state_dict["size"])])
        drawn_for_step = state_dict.get("drawn_for_step")
        self._drawn_for_step = None if drawn_for_step is None else int(drawn_for_step)
        self._rng.setstate(
            (
                state_dict["rng_version"],
                tuple(state_dict["rng_internal"]),
                state_dict["rng_gauss_next"],
            )
        )
