"""Engine-independent pieces of a training run: checkpoint contents, resume, RNG, data order.

The native ``Trainer`` and the Lightning bridge (``vistrain.pl``) both build checkpoints,
resume from them and start each epoch's data iterator through these functions, so the two
engines share one checkpoint format and one resume contract (DESIGN section 5):

- ``collect_checkpoint`` assembles the full training state (collective);
- ``restore_checkpoint`` checks a file against the run, restores it and says where the loop
  starts;
- ``start_epoch_iterator`` starts an epoch's iterator, replaying the epoch's random draws and
  skipping the batches already done on a mid-epoch resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.common.distributed import all_gather_object, get_rank, get_world_size, unwrap_model
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.checkpointing import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_model_state,
    load_checkpoint,
)
from vistrain.engine.optim import LRSchedulerWrapper
from vistrain.engine.rng import capture_rng_state, restore_rng_state

logger = logging.getLogger("vistrain")


def as_list(value: Any, what: str, kind: type) -> list[Any]:
    """``value`` (one object, a sequence, or None) as a list of ``kind`` objects.

    Raises:
        TypeError: If an item is not a ``kind``; the message names ``what``.
    """
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, kind):
            raise TypeError(f"{what} must be {kind.__name__} objects, got {type(item).__name__}.")
    return items


def as_loader_list(value: DataLoader[Any] | Sequence[DataLoader[Any]] | None) -> list[Any]:
    """Test loaders as a list (one loader, several, or None).

    Raises:
        TypeError: If an item is not a ``DataLoader``.
    """
    if value is None:
        return []
    if isinstance(value, DataLoader):
        return [value]
    loaders = list(value)
    for idx, loader in enumerate(loaders):
        if not isinstance(loader, DataLoader):
            raise TypeError(f"test_dataloader[{idx}] is {type(loader).__name__}, not a DataLoader.")
    return loaders


def check_optimizers_train(
    optimizers: Sequence[Optimizer], model: nn.Module, loss_module: nn.Module
) -> None:
    """Refuse an optimizer that holds none of the parameters being trained.

    Such an optimizer (built from another instance of the model, say) would step nothing
    and the run would train nothing, silently. Holding only some parameters is fine
    (frozen parts); the loss module's own parameters count as trained.

    Raises:
        ValueError: Naming the optimizer that holds none of them.
    """
    trained = {id(p) for p in model.parameters()} | {id(p) for p in loss_module.parameters()}
    for idx, optimizer in enumerate(optimizers):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if params and not any(id(p) in trained for p in params):
            raise ValueError(
                f"optimizers[{idx}] ({type(optimizer).__name__}) holds none of the parameters "
                "of the model or the loss module; build it from model.parameters() of the "
                "model passed to fit()."
            )


def num_batches(loader: Any) -> int | None:
    """Batches per epoch of ``loader``, or None when it has no length."""
    if loader is None:
        return None
    try:
        return len(loader)
    except TypeError:
        return None


def callback_state_keys(callbacks: Sequence[Callback]) -> list[str]:
    """Checkpoint keys of the callbacks: class name, with ``#2``, ``#3`` for repeats."""
    seen: dict[str, int] = {}
    keys = []
    for callback in callbacks:
        name = type(callback).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


def _loader_generator(loader: Any) -> torch.Generator | None:
    generator = getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def capture_loop_rng(loader: Any) -> dict[str, Any]:
    """Global generators plus the training loader's own generator (it draws worker seeds)."""
    state = capture_rng_state()
    generator = _loader_generator(loader)
    if generator is not None:
        state["loader_generator"] = generator.get_state()
    return state


def restore_loop_rng(state: dict[str, Any], loader: Any) -> None:
    """Restore what ``capture_loop_rng`` captured."""
    restore_rng_state(state)
    generator = _loader_generator(loader)
    if generator is not None and "loader_generator" in state:
        generator.set_state(state["loader_generator"])


def start_epoch_iterator(
    loader: Any,
    epoch: int,
    skip_batches: int = 0,
    resume_rng: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> tuple[Iterator[Any], dict[str, Any]]:
    """Start ``loader``'s iterator for ``epoch``; return it and the epoch-start RNG states.

    On a mid-epoch resume, ``resume_rng`` is (RNG at the epoch's start, RNG at the
    checkpoint): the epoch's draws (sampler permutation, worker seeds) are replayed, the
    ``skip_batches`` batches already trained are loaded and dropped (so per-worker random
    streams stay aligned), and the checkpoint's RNG states are restored.
    """
    sampler: Any = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if resume_rng is not None:
        restore_loop_rng(resume_rng[0], loader)
    epoch_start_rng = capture_loop_rng(loader)
    iterator = iter(loader)
    for _ in range(skip_batches):
        next(iterator)
    if resume_rng is not None:
        restore_loop_rng(resume_rng[1], loader)
    return iterator, epoch_start_rng


def collect_checkpoint(
    *,
    trainer_state: TrainerState,
    model: nn.Module,
    optimizers: Sequence[Optimizer],
    lr_schedulers: Sequence[LRSchedulerWrapper],
    callbacks: Sequence[Callback],
    epoch: int,
    epoch_finished: bool,
    batches_done: int,
    global_step: int,
    val_logs: dict[str, float],
    train_dataloader: Any,
    epoch_start_rng: dict[str, Any] | None,
) -> dict[str, Any]:
    """Collective: the complete training state; every rank must call it.

    Runs every callback's ``on_save_checkpoint`` first, then gathers the RNG states of all
    ranks. Only rank 0 needs to write the result.
    """
    for callback in callbacks:
        callback.on_save_checkpoint(trainer_state, model)
    callback_states = {}
    for key, callback in zip(callback_state_keys(callbacks), callbacks):
        cb_state = callback.state_dict()
        if cb_state:
            callback_states[key] = cb_state
    rng = all_gather_object(capture_loop_rng(train_dataloader))
    epoch_rng = all_gather_object(epoch_start_rng)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "epoch_finished": epoch_finished,
        "batches_done": batches_done,
        "global_step": global_step,
        "state_dict": unwrap_model(model).state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "lr_schedulers": [sched.state_dict() for sched in lr_schedulers],
        "callbacks": callback_states,
        "rng": rng,
        "sampler": {"epoch_start_rng": epoch_rng},
        "world_size": get_world_size(),
        "val_logs": dict(val_logs),
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
    """

    start_epoch: int
    skip_batches: int
    global_step: int
    val_logs: dict[str, float] = field(default_factory=dict)
    resume_rng: tuple[dict[str, Any], dict[str, Any]] | None = None


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
        CheckpointError: If it is unreadable, foreign, or its weights do not fit the model.
        ValueError: If the numbers of optimizers or schedulers differ from the checkpoint's.
    """
    ckpt = load_checkpoint(ckpt_path)
    bare = unwrap_model(model)
    check_model_state(bare, ckpt["state_dict"], ckpt_path)
    for what, saved, have in (
        ("optimizer", ckpt["optimizers"], optimizers),
        ("scheduler", ckpt["lr_schedulers"], lr_schedulers),
    ):
        if len(saved) != len(have):
            raise ValueError(
                f"Checkpoint {ckpt_path} holds {len(saved)} {what} states but this run has "
                f"{len(have)} {what}s; build the run with the same {what}s."
            )
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


def lr_scalars(optimizers: Sequence[Optimizer]) -> dict[str, float]:
    """Learning rates to log: ``lr``, or ``lr/opt<i>[/group<j>]`` for several."""
    scalars: dict[str, float] = {}
    for opt_idx, optimizer in enumerate(optimizers):
        for group_idx, group in enumerate(optimizer.param_groups):
            suffix = "" if len(optimizers) == 1 else f"/opt{opt_idx}"
            if len(optimizer.param_groups) > 1:
                suffix += f"/group{group_idx}"
            scalars[f"lr{suffix}"] = float(group["lr"])
    return scalars
