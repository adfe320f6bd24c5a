"""Optimizers and learning-rate schedules: windows of torch schedulers, learning rates to log.

A schedule is a list of ``LRSchedulerConfig`` entries, each a torch scheduler class with its
keyword arguments and a window ``[begin, end)`` counted in optimizer steps or in epochs.
Windows follow vis4d's convention: a scheduler is created when its window opens (taking the
learning rate the previous one left as its start) and stepped once after every step (or
epoch) inside the window, ``end - begin`` times in all. So a linear warm-up over the first
500 steps followed by a cosine decay over epochs 1..99 reads::

    scheduler = LRSchedulerWrapper(optimizer, [
        LRSchedulerConfig(LinearLR, {"start_factor": 0.01, "total_iters": 500}, 0, 500, False),
        LRSchedulerConfig(CosineAnnealingLR, {"T_max": 99}, 1, 100, True),
    ])

and the warm-up ends at exactly the base learning rate after step 500. The engines call
``step_on_batch`` after every optimizer step and ``step`` after every epoch. ``state_dict``
captures every constructed scheduler and the optimizer's current learning rates, so a resume
continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, LRScheduler

from vistrain.common.checks import check_finite_float, check_positive_int
from vistrain.op.norm import NORM_TYPES


@dataclass
class LRSchedulerConfig:
    """One scheduler and the window it runs in.

    Attributes:
        scheduler: A torch ``LRScheduler`` subclass.
        kwargs: Its keyword arguments (without the optimizer).
        begin: First step (or epoch) the scheduler is active (0-based).
        end: First step (or epoch) it is no longer active; None = to the end. The
            scheduler is stepped ``end - begin`` times.
        epoch_based: Counted in epochs (stepped after each epoch) or in optimizer steps.
    """

    scheduler: type[LRScheduler]
    kwargs: dict[str, Any] = field(default_factory=dict)
    begin: int = 0
    end: int | None = None
    epoch_based: bool = True


class LRSchedulerWrapper:
    """Runs a list of torch schedulers on one optimizer, each inside its window.

    Args:
        optimizer: The optimizer whose learning rates are scheduled.
        schedulers: The scheduler configurations, in the order they apply.

    Raises:
        ValueError: If a window is empty or negative.
        TypeError: If an entry is not an ``LRSchedulerConfig`` of a torch scheduler.
    """

    def __init__(self, optimizer: Optimizer, schedulers: list[LRSchedulerConfig]) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch Optimizer, got {type(optimizer).__name__}.")
        for idx, cfg in enumerate(schedulers):
            if not isinstance(cfg, LRSchedulerConfig):
                raise TypeError(f"schedulers[{idx}] must be an LRSchedulerConfig, got {cfg!r}.")
            if not (isinstance(cfg.scheduler, type) and issubclass(cfg.scheduler, LRScheduler)):
                raise TypeError(
                    f"schedulers[{idx}].scheduler must be a torch LRScheduler class, "
                    f"got {cfg.scheduler!r}."
                )
            if cfg.begin < 0 or (cfg.end is not None and cfg.end <= cfg.begin):
                raise ValueError(
                    f"schedulers[{idx}] has window [{cfg.begin}, {cfg.end}); begin must be >= 0 "
                    "and end > begin (or None)."
                )
        self.optimizer = optimizer
        self.configs = list(schedulers)
        self.schedulers: list[LRScheduler | None] = [None] * len(schedulers)
        self._maybe_start(0, epoch_based=False)
        self._maybe_start(0, epoch_based=True)

    def _active(self, cfg: LRSchedulerConfig, position: int) -> bool:
        return cfg.begin <= position and (cfg.end is None or position < cfg.end)

    def _maybe_start(self, position: int, epoch_based: bool) -> None:
        for idx, cfg in enumerate(self.configs):
            started = self.schedulers[idx] is not None
            if cfg.epoch_based == epoch_based and not started and self._active(cfg, position):
                self.schedulers[idx] = cfg.scheduler(self.optimizer, **cfg.kwargs)

    def _advance(self, position: int, epoch_based: bool) -> None:
        """Step (or epoch) ``position - 1`` is done: step the schedulers whose window holds it.

        Then start those whose window opens at ``position``.
        """
        for idx, cfg in enumerate(self.configs):
            sched = self.schedulers[idx]
            if (
                cfg.epoch_based == epoch_based
                and sched is not None
                and self._active(cfg, position - 1)
            ):
                sched.step()
        self._maybe_start(position, epoch_based)

    def step_on_batch(self, global_step: int) -> None:
        """Advance step-based schedulers after optimizer step number ``global_step`` (1-based)."""
        self._advance(global_step, epoch_based=False)

    def step(self, epoch: int) -> None:
        """Advance epoch-based schedulers after epoch ``epoch`` (0-based) has finished."""
        self._advance(epoch + 1, epoch_based=True)

    def get_last_lr(self) -> list[float]:
        """Current learning rate of every parameter group."""
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Constructed schedulers' states and the optimizer's current learning rates."""
        return {
            "schedulers": [None if s is None else s.state_dict() for s in self.schedulers],
            "lrs": self.get_last_lr(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from ``state_dict``; constructs the schedulers that had started.

        Raises:
            ValueError: If the state was saved for a different number of schedulers.
        """
        states = state_dict["schedulers"]
        if len(states) != len(self.configs):
            raise ValueError(
                f"Scheduler state has {len(states)} schedulers but this wrapper has "
                f"{len(self.configs)}; the schedule configuration changed since the checkpoint."
            )
        for idx, (cfg, state) in enumerate(zip(self.configs, states)):
            if state is None:
                self.schedulers[idx] = None
                continue
            if self.schedulers[idx] is None:
                self.schedulers[idx] = cfg.scheduler(self.optimizer, **cfg.kwargs)
            sched = self.schedulers[idx]
            if sched is not None:
                sched.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, state_dict["lrs"]):
            group["lr"] = lr


def warmup_cosine(
    optimizer: Optimizer,
    warmup_steps: int,
    num_epochs: int,
    warmup_start_factor: float = 0.001,
    min_lr_factor: float = 0.05,
    warmup_epochs_done: int = 1,
) -> LRSchedulerWrapper:
    """Linear warm-up over ``warmup_steps`` steps, then a per-epoch cosine to the end.

    Args:
        optimizer: The optimizer.
        warmup_steps: Optimizer steps of linear warm-up (0 disables it).
        num_epochs: Total training epochs; the cosine ends there.
        warmup_start_factor: Learning-rate factor at the first step.
        min_lr_factor: Final learning rate as a fraction of the base one.
        warmup_epochs_done: Epoch at which the cosine starts.

    Raises:
        TypeError: If a count is not an int or a factor not a number.
        ValueError: If a count or a factor is out of range.
    """
    check_positive_int("warmup_steps", warmup_steps, {0: "no warm-up"})
    check_positive_int("num_epochs", num_epochs)
    check_finite_float("warmup_start_factor", warmup_start_factor, 1e-12, 1.0)
    check_finite_float("min_lr_factor", min_lr_factor, 0.0, 1.0)
    base_lr = float(optimizer.param_groups[0]["lr"])
    configs: list[LRSchedulerConfig] = []
    if warmup_steps > 0:
        configs.append(
            LRSchedulerConfig(
                LinearLR,
                {"start_factor": warmup_start_factor, "total_iters": warmup_steps},
                begin=0,
                end=warmup_steps,
                epoch_based=False,
            )
        )
    start = min(warmup_epochs_done, num_epochs - 1)
    if num_epochs - start >= 1:
        configs.append(
            LRSchedulerConfig(
                CosineAnnealingLR,
                {"T_max": max(num_epochs - start, 1), "eta_min": base_lr * min_lr_factor},
                begin=start,
                end=num_epochs,
                epoch_based=True,
            )
        )
    return LRSchedulerWrapper(optimizer, configs)


def fused_sgd_supported() -> bool:
    """Whether this torch has the fused SGD update for CPU tensors (torch >= 2.4).

    The fused update runs one kernel over every parameter tensor instead of a Python loop
    over them; YOLOX-nano has about 330 tensors, and on a 2-core CPU the looped update
    took 14 ms of a ~200 ms step, the fused one 1.4 ms, with the same arithmetic. Older
    torch versions refuse ``fused=True`` for CPU tensors (or do not know the argument).
    """
    probe = torch.zeros(1, requires_grad=True)
    try:
        torch.optim.SGD([probe], lr=0.1, momentum=0.9, nesterov=True, fused=True)
    except (TypeError, RuntimeError):
        return False
    return True


def sgd_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the parameters into a weight-decayed group and one without decay.

    Convolution and linear weights decay; normalisation weights and every bias do not
    (decaying them only pulls the scales of the normalised features towards zero).

    Returns:
        Two parameter groups for ``torch.optim`` (an empty one is left out).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, NORM_TYPES) or name == "bias" or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


class WarmCosFactor:
    """Learning-rate factor per optimizer step of YOLOX's ``yoloxwarmcos`` schedule.

    Quadratic warm-up from 0 over ``warmup_steps``, a cosine from 1 down to ``min_ratio``
    that ends ``flat_steps`` before ``total_steps``, then ``min_ratio`` to the end. A plain
    object rather than a closure so that ``LambdaLR.state_dict`` records its settings.
    """

    def __init__(
        self, warmup_steps: int, total_steps: int, flat_steps: int, min_ratio: float
    ) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.flat_steps = flat_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        """Factor of the peak learning rate after ``step`` optimizer steps."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return (step / self.warmup_steps) ** 2
        cosine_end = self.total_steps - self.flat_steps
        if step >= cosine_end:
            return self.min_ratio
        progress = (step - self.warmup_steps) / max(cosine_end - self.warmup_steps, 1)
        return self.min_ratio + 0.5 * (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * progress))


def yolox_warm_cos(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int,
    flat_steps: int,
    min_lr_ratio: float = 0.05,
) -> LRSchedulerWrapper:
    """YOLOX's schedule, per optimizer step: quadratic warm-up, cosine, flat minimum.

    The learning rate of step ``k`` (0-based) is ``lr * f(k)`` with ``f`` of
    :class:`WarmCosFactor`; the first step runs at 0 as official YOLOX's does (its
    ``warmup_lr`` is 0). The flat tail is meant to cover the epochs without mosaic.

    Args:
        optimizer: The optimizer; its current learning rates are the peak ones.
        warmup_steps: Steps of quadratic warm-up (0 disables it).
        total_steps: Steps of the whole run.
        flat_steps: Last steps held at ``min_lr_ratio * lr``.
        min_lr_ratio: Final learning rate as a fraction of the peak one.

    Raises:
        ValueError: If the warm-up and the flat tail do not fit into the run.
    """
    if warmup_steps < 0 or flat_steps < 0 or warmup_steps + flat_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} and flat_steps={flat_steps} must be >= 0 and fit "
            f"into total_steps={total_steps}."
        )
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1].")
    factor = WarmCosFactor(warmup_steps, total_steps, flat_steps, min_lr_ratio)
    config = LRSchedulerConfig(LambdaLR, {"lr_lambda": factor}, 0, None, epoch_based=False)
    return LRSchedulerWrapper(optimizer, [config])


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
