"""What a checkpoint holds and how a run continues from one (DESIGN section 5).

Both engines and ``CheckpointCallback`` build checkpoints with ``collect_checkpoint`` (one
writer of the format) and resume with ``restore_checkpoint``; the file IO itself is in
``vistrain.engine.checkpoint_io``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer

from vistrain.common.distributed import all_gather_object, get_rank, get_world_size, unwrap_model
from vistrain.engine.checkpoint_io import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_model_state,
    check_training_state,
    load_checkpoint,
)
from vistrain.engine.optim import LRSchedulerWrapper
from vistrain.engine.rng import capture_loop_rng, restore_loop_rng

if TYPE_CHECKING:  # the callbacks import this module: types only, no import cycle
    from vistrain.engine.callbacks.base import Callback
    from vistrain.engine.callbacks.trainer_state import TrainerState

logger = logging.getLogger("vistrain")


def callback_state_keys(callbacks: Sequence[Callback]) -> list[str]:
    """Checkpoint keys of the callbacks: class name, with ``#2``, ``#3`` for repeats."""
    seen: dict[str, int] = {}
    keys = []
    for callback in callbacks:
        name = type(callback).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


def collect_checkpoint(
    trainer_state: TrainerState,
    model: nn.Module,
    callbacks: Sequence[Callback],
    *,
    epoch_finished: bool,
    batches_done: int | None = None,
    epoch_start_rng: dict[str, Any] | None = None,
    train_time_s: float = 0.0,
    step_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collective: the complete training state; every rank must call it.

    Runs every callback's ``on_save_checkpoint`` first, then gathers the RNG states of all
    ranks. Only rank 0 needs to write the result. Epoch, step, optimizers, schedulers, the
    training loader and the latest validation logs are read from ``trainer_state``, so an
    engine's state and a hand-built one give the same format.

    Args:
        trainer_state: The state at the save point.
        model: The trained model (DDP wrappers are stripped).
        callbacks: Callbacks whose ``state_dict()`` is stored.
        epoch_finished: Whether the epoch of ``trainer_state`` has ended (a resume starts the
            next one) or not (a resume continues inside it).
        batches_done: Batches of the epoch done; None reads ``trainer_state["batches_done"]``
            (or the epoch's length once it finished).
        epoch_start_rng: This rank's RNG states at the epoch's start, for a mid-epoch resume.
        train_time_s: Training seconds spent so far (``Trainer(max_time=...)``).
        step_state: The optimizer step's own state (``LoopState``: the fp16 loss scaler, the
            skipped-step count, an open accumulation window's gradients), stored as ``step``.
    """
    for callback in callbacks:
        callback.on_save_checkpoint(trainer_state, model)
    callback_states = {}
    for key, callback in zip(callback_state_keys(callbacks), callbacks):
        cb_state = callback.state_dict()
        if cb_state:
            callback_states[key] = cb_state
    if batches_done is None:
        default = (trainer_state.get("num_train_batches") or 0) if epoch_finished else 0
        batches_done = trainer_state.get("batches_done", default)
    train_dataloader = trainer_state.get("train_dataloader")
    optimizers: Sequence[Optimizer] = trainer_state.get("optimizers", [])
    lr_schedulers: Sequence[LRSchedulerWrapper] = trainer_state.get("lr_schedulers", [])
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": trainer_state["current_epoch"],
        "epoch_finished": epoch_finished,
        "batches_done": batches_done,
        "global_step": trainer_state["global_step"],
        "state_dict": unwrap_model(model).state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "lr_schedulers": [sched.state_dict() for sched in lr_schedulers],
        "callbacks": callback_states,
        "rng": all_gather_object(capture_loop_rng(train_dataloader)),
        "sampler": {"epoch_start_rng": all_gather_object(epoch_start_rng)},
        "world_size": get_world_size(),
        "val_logs": dict(trainer_state.get("val_logs") or {}),
        "train_time_s": float(train_time_s),
        "step": dict(step_state or {}),
    }


@dataclass
class ResumePoint:
    """Where a resumed loop starts, and the random states it continues with.

    Attributes:
        start_epoch: The epoch the loop enters first.
        skip_batches: Batches of that epoch already trained (mid-epoch checkpoints).
        global_step: Optimizer steps already done.
        val_logs: The latest validation logs at the checkpoint.
        resume_rng: For a mid-epoch resume, (this rank's RNG at the epoch's start, at the
            checkpoint), for ``start_epoch_iterator``; None otherwise.
        train_time_s: Training seconds spent up to the checkpoint (``max_time``).
        step_state: The checkpoint's ``step`` entry (loss scaler, skipped steps, an open
            window's gradients); empty for checkpoints written before it existed.
    """

    start_epoch: int
    skip_batches: int
    global_step: int
    val_logs: dict[str, float] = field(default_factory=dict)
    resume_rng: tuple[dict[str, Any], dict[str, Any]] | None = None
    train_time_s: float = 0.0
    step_state: dict[str, Any] = field(default_factory=dict)


def restore_checkpoint(
    ckpt_path: str,
    *,
    model: nn.Module,
    optimizers: Sequence[Optimizer],
    lr_schedulers: Sequence[LRSchedulerWrapper],
    callbacks: Sequence[Callback],
    train_dataloader: Any,
) -> ResumePoint:
    """Restore everything from ``ckpt_path`` and say where the loop starts.

    Every check happens before any state is changed, so a checkpoint that does not fit
    leaves model, optimizers and callbacks untouched. An epoch-end checkpoint restores this
    rank's RNG states at once; a mid-epoch one hands them to ``start_epoch_iterator``.

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If it is unreadable, foreign, lacks a key a resume needs, or its
            weights, optimizers or schedulers do not fit the run.
    """
    ckpt = load_checkpoint(ckpt_path)
    bare = unwrap_model(model)
    check_model_state(bare, ckpt["state_dict"], ckpt_path)
    check_training_state(ckpt, ckpt_path, optimizers, lr_schedulers)
    bare.load_state_dict(ckpt["state_dict"])
    for optimizer, opt_state in zip(optimizers, ckpt["optimizers"]):
        optimizer.load_state_dict(opt_state)
    for scheduler, sched_state in zip(lr_schedulers, ckpt["lr_schedulers"]):
        scheduler.load_state_dict(sched_state)
    saved = ckpt.get("callbacks", {})
    keys = callback_state_keys(callbacks)
    for key, callback in zip(keys, callbacks):
        if key in saved:
            callback.load_state_dict(saved[key])
    unused = set(saved) - set(keys)
    if unused:
        logger.warning("Checkpoint %s has state for absent callbacks: %s", ckpt_path, unused)

    rank = get_rank()
    same_world = int(ckpt.get("world_size", 1)) == get_world_size()
    if not same_world:
        logger.warning(
            "Checkpoint %s was written by %s processes, this run has %s: RNG streams are "
            "not restored per rank, so the continuation is not bit-identical.",
            ckpt_path,
            ckpt.get("world_size"),
            get_world_size(),
        )

    def this_rank(states: list[Any] | None) -> Any:
        states = states or []
        return states[rank] if same_world and rank < len(states) else None

    rank_rng = this_rank(ckpt.get("rng"))
    epoch = int(ckpt["epoch"])
    point = ResumePoint(
        start_epoch=epoch + 1,
        skip_batches=0,
        global_step=int(ckpt["global_step"]),
        val_logs=dict(ckpt.get("val_logs", {})),
        train_time_s=float(ckpt.get("train_time_s", 0.0)),
        step_state=dict(ckpt.get("step") or {}),
    )
    if ckpt.get("epoch_finished", True):
        if rank_rng is not None:
            restore_loop_rng(rank_rng, train_dataloader)
        logger.info("Resumed from %s at the start of epoch %d.", ckpt_path, epoch + 1)
        return point
    point.start_epoch, point.skip_batches = epoch, int(ckpt["batches_done"])
    epoch_rng = this_rank(ckpt.get("sampler", {}).get("epoch_start_rng"))
    if epoch_rng is not None and rank_rng is not None:
        point.resume_rng = (epoch_rng, rank_rng)
    logger.info(
        "Resumed from %s in epoch %d after %d batches.", ckpt_path, epoch, point.skip_batches
    )
    return point
