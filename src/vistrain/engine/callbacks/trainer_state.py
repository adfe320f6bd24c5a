"""Trainer state for callbacks."""

# No ``from __future__ import annotations`` here: TypedDict must see NotRequired[...] as
# objects, not strings, to tell required from optional keys at run time.

from typing import TYPE_CHECKING, Any, Protocol

from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import NotRequired, TypedDict

from vistrain.common.typing import DictData

if TYPE_CHECKING:
    from vistrain.engine.optim import LRSchedulerWrapper


class TrainingEngine(Protocol):
    """What a callback may ask of the engine that runs it (native Trainer or Lightning).

    These documented methods are the only way callbacks change the loop: nothing pokes
    attributes of a trainer.
    """

    def set_train_dataloader(self, dataloader: DataLoader[Any]) -> None:
        """Train on ``dataloader`` from the next epoch on."""

    def set_check_val_every_n_epoch(self, every_n_epochs: int) -> None:
        """Validate every ``every_n_epochs`` epochs from now on."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Collective: the complete training state to save (every rank must call it)."""
        ...


class TrainerState(TypedDict):
    """State of the trainer, passed to every hook.

    Attributes:
        current_epoch: Current epoch (0-based).
        num_epochs: Total number of training epochs (-1 = no limit).
        global_step: Optimizer steps done so far.
        num_steps: Total number of training steps (-1 = no limit).
        train_dataloader: Training dataloader.
        num_train_batches: Number of training batches per epoch.
        test_dataloader: List of test dataloaders.
        num_test_batches: Number of batches of each test dataloader.
        train_module: The engine running the loop (see ``TrainingEngine``).
        train_engine: ``"native"`` or ``"pl"``.
        optimizers: Optimizers (present in every training hook).
        lr_schedulers: Learning-rate scheduler wrappers (present in every training hook).
        metrics: Loss metrics of the current training step.
        val_logs: Logs of the latest validation (for best-checkpoint selection).
        batches_done: Training batches finished in the current epoch.
    """

    current_epoch: int
    num_epochs: int
    global_step: int
    num_steps: int
    train_dataloader: DataLoader[DictData] | None
    num_train_batches: int | None
    test_dataloader: list[DataLoader[DictData]] | None
    num_test_batches: list[int] | None
    train_module: NotRequired[TrainingEngine]
    train_engine: NotRequired[str]
    optimizers: NotRequired[list[Optimizer]]
    lr_schedulers: NotRequired[list["LRSchedulerWrapper"]]
    metrics: NotRequired[dict[str, Any]]
    val_logs: NotRequired[dict[str, float]]
    batches_done: NotRequired[int]
