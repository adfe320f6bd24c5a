"""Trainer state for callbacks: the ``TrainerState`` dict and the engine protocol behind it."""

# No ``from __future__ import annotations`` here: TypedDict must see NotRequired[...] as
# objects, not strings, to tell required from optional keys at run time, and
# ``typing.get_type_hints(TrainerState)`` must resolve every name (so no name is imported
# for type checking only).

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import NotRequired, TypedDict

from vistrain.common.typing import DictData
from vistrain.engine.optim import LRSchedulerWrapper


class StepMetrics(Mapping[str, float]):
    """The loss metrics of one training step, read as floats (``TrainerState["metrics"]``).

    The loss module returns tensors, possibly on a GPU; turning them into Python floats
    waits for the device. This read-only mapping converts a value only when a callback reads
    it (``round(m["loss"], 3)``, ``json.dumps(dict(m))``), so a step nobody reads costs no
    device sync. Code that aggregates on the device (``LoggingCallback``) takes the tensors
    as they are with ``tensors()``.

    Args:
        values: Metric name to a scalar tensor or a number, as the loss module returns them.
    """

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> float:
        return float(self._values[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"StepMetrics({list(self._values)})"

    def tensors(self) -> dict[str, Any]:
        """The values as the loss module returned them (tensors stay on their device)."""
        return self._values


def metric_tensors(trainer_state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The step's metrics without a device sync.

    ``StepMetrics.tensors()``, or the plain dict a hand-built state holds; None when the
    state has none.
    """
    metrics = trainer_state.get("metrics")
    if isinstance(metrics, StepMetrics):
        return metrics.tensors()
    return None if metrics is None else dict(metrics)


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

    def request_stop(self, reason: str, exit_code: int = 0, checkpoint: bool = True) -> None:
        """End training at the next step boundary, where all ranks agree.

        A checkpoint of that step is saved when ``checkpoint``; ``exit_code`` is the command
        line's exit status.
        """


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
        metrics: Loss metrics of the current training step, read as floats (a
            ``StepMetrics``; its ``tensors()`` gives them without a device sync).
        val_logs: Logs of the latest validation (for best-checkpoint selection).
        batches_done: Training batches finished in the current epoch.
        step_end: In ``on_train_batch_end``: whether this batch ended an accumulation window,
            so the optimizers stepped (or fp16 skipped the step) and ``global_step`` just
            advanced. Always True without gradient accumulation.
        step_skipped: In ``on_train_batch_end``: whether fp16 loss scaling skipped this
            batch's step (inf/nan gradients; the weights did not change).
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
    lr_schedulers: NotRequired[list[LRSchedulerWrapper]]
    metrics: NotRequired[Mapping[str, float]]
    val_logs: NotRequired[dict[str, float]]
    batches_done: NotRequired[int]
    step_end: NotRequired[bool]
    step_skipped: NotRequired[bool]
