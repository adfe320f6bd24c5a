"""A run's parameters on disk, and what ``--resume`` does when they changed.

Every run writes its experiment name and parameters to ``<run folder>/params.json`` and
(through ``RunInfoCallback``) into every checkpoint. ``vistrain fit --resume`` compares the
parameters it was given with the checkpoint's and lists every difference; each key is
handled as ``RESUME_POLICY`` says:

- ``applied``: takes effect from the resume on (intervals, workers, augmentation, what
  validation measures); nothing of the checkpoint depends on it.
- ``re-planned``: the learning-rate schedule (and the optimizer's hyperparameters) are
  rebuilt from the new values and moved to the checkpoint's step, as if the run had been
  planned so from its start (``ScheduleReplanCallback``). A longer ``num_epochs`` thus
  stretches the cosine to the new end instead of restarting it at its peak, and a new ``lr``
  is used instead of being overwritten by the checkpoint's optimizer state.
- ``refused``: the change would make the checkpoint's position or weights mean something
  else (the batch size or the data change which samples an epoch's remaining steps see; a
  new model shape does not fit the weights): a clear error suggests a new run instead.

Keys not in the table (an experiment file's own) are refused unless the experiment module
declares them in its own ``RESUME_POLICY`` dict (same form), so nothing is ignored silently.
Resuming a run that has trained all its epochs says so and does nothing; asking for fewer
epochs than the checkpoint has trained is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn
from torch.optim import Optimizer

from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.checkpoint_io import load_checkpoint, write_bytes_atomic
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import LRSchedulerWrapper
from vistrain.run_info import RUN_INFO_KEY, checkpoint_experiment, experiment_name

logger = logging.getLogger("vistrain")

PARAMS_NAME = "params.json"
"""File of a run folder that holds the experiment name and its parameters."""

APPLIED, REPLANNED, REFUSED = "applied", "re-planned", "refused"

_DATA = "it changes the training samples, so the checkpoint's position in its epoch"
_DATA += " would point at other samples"
_MODEL = "it changes the model, so the checkpoint's weights do not fit"
_SCHEDULE = "the LR schedule is rebuilt and moved to the checkpoint's step"
_LATER = "takes effect from the resume on"

RESUME_POLICY: dict[str, tuple[str, str]] = {
    # loop length and the learning-rate schedule
    "num_epochs": (REPLANNED, _SCHEDULE + "; the no-augmentation tail follows the new end"),
    "lr": (REPLANNED, _SCHEDULE + " from the new base lr"),
    "lr_per_64": (REPLANNED, _SCHEDULE + " from the new base lr"),
    "warmup_epochs": (REPLANNED, _SCHEDULE),
    "min_lr_ratio": (REPLANNED, _SCHEDULE),
    "no_aug_epochs": (REPLANNED, _SCHEDULE + "; the mode switch moves with it"),
    "switch_epoch": (REPLANNED, "the mode switch happens at the new epoch"),
    "momentum": (REPLANNED, "the optimizer takes the new value (its state is kept)"),
    "weight_decay": (REPLANNED, "the optimizer takes the new value (its state is kept)"),
    # what a step sees: refused
    "batch_size": (REFUSED, "it changes the batches of every epoch and the steps per epoch"),
    "num_train_images": (REFUSED, _DATA),
    "train_ann": (REFUSED, _DATA),
    "train_images": (REFUSED, _DATA),
    "seed": (REFUSED, "it changes the shuffling and augmentation streams the run continues"),
    "data_seed": (REFUSED, _DATA),
    "max_objects": (REFUSED, _DATA),
    "image_size": (REFUSED, _DATA),
    "num_classes": (REFUSED, _MODEL),
    "size": (REFUSED, _MODEL),
    "ema": (REFUSED, _MODEL),
    "norm": (REFUSED, _MODEL),
    "init_weights": (REFUSED, "a resume takes its weights from the checkpoint"),
    "freeze_backbone": (REFUSED, "it changes which parameters the optimizer trains"),
    "freeze_bn": (REFUSED, "it changes which parameters the optimizer trains"),
    # intervals, loaders, evaluation, augmentation: from the resume on
    "checkpoint_period": (APPLIED, _LATER),
    "val_every": (APPLIED, _LATER),
    "log_every": (APPLIED, _LATER),
    "vis_every": (APPLIED, _LATER),
    "num_workers": (APPLIED, _LATER),
    "num_threads": (APPLIED, _LATER),
    "cache_dir": (APPLIED, "the data is read from there (same generation settings)"),
    "num_val_images": (APPLIED, "validations from the resume on measure other images"),
    "val_ann": (APPLIED, "validations from the resume on measure other images"),
    "val_images": (APPLIED, "validations from the resume on measure other images"),
    "score_threshold": (APPLIED, _LATER + " (evaluation only)"),
    "nms_threshold": (APPLIED, _LATER + " (evaluation only)"),
    "ema_decay": (APPLIED, _LATER),
    "ema_warmup_steps": (APPLIED, _LATER),
    "resize_steps": (APPLIED, _LATER),
    "resize_interval": (APPLIED, _LATER),
    "multiscale_min": (APPLIED, _LATER),
    "multiscale_max": (APPLIED, _LATER),
    "mosaic_prob": (APPLIED, _LATER),
    "mosaic_scale_min": (APPLIED, _LATER),
    "mosaic_scale_max": (APPLIED, _LATER),
    "mixup_prob": (APPLIED, _LATER),
    "mixup_scale_min": (APPLIED, _LATER),
    "mixup_scale_max": (APPLIED, _LATER),
    "degrees": (APPLIED, _LATER),
    "translate": (APPLIED, _LATER),
    "shear": (APPLIED, _LATER),
    "hsv_prob": (APPLIED, _LATER),
    "flip_prob": (APPLIED, _LATER),
    # how a step is computed (zoo/engine_params.py)
    "precision": (APPLIED, _LATER + " (a new fp16 loss scaler starts at its initial scale)"),
    "accumulate_grad_batches": (
        REFUSED,
        "it changes the optimizer steps per epoch that the loop position and schedule count",
    ),
    "gradient_clip_val": (APPLIED, _LATER),
    "gradient_clip_algorithm": (APPLIED, _LATER),
    "compile": (APPLIED, _LATER + " (checkpoints keep plain parameter names)"),
    "channels_last": (APPLIED, _LATER),
    # monitoring and run control (zoo/monitoring.py)
    "early_stop_patience": (APPLIED, _LATER + " (the wait count so far is kept)"),
    "loggers": (APPLIED, "the chosen scalar writers take the history on from the resume"),
    "profile_steps": (APPLIED, _LATER),
    "max_time": (APPLIED, "the new budget counts the training time already spent"),
}
"""What ``--resume`` does with a changed key of a built-in experiment: (action, why)."""


class ResumeRefusedError(ValueError):
    """``--resume`` was given settings the checkpoint cannot continue with."""


def params_record(params: Any) -> dict[str, Any]:
    """The parameters as JSON values (tuples become lists), in field order."""
    return json.loads(json.dumps(dataclasses.asdict(params)))


def write_params_json(output_dir: str, experiment: str, params: Any) -> str:
    """Write ``<output_dir>/params.json`` (crash-consistent); return its path."""
    path = os.path.join(output_dir, PARAMS_NAME)
    record = {"experiment": experiment, "params": params_record(params)}
    write_bytes_atomic((json.dumps(record, indent=1) + "\n").encode("utf-8"), path)
    return path


@dataclass
class Change:
    """One key whose value differs from the checkpoint's run."""

    key: str
    old: Any
    new: Any
    action: str
    why: str

    def describe(self) -> str:
        """``key: old -> new (action: why)``."""
        return f"{self.key}: {self.old!r} -> {self.new!r} ({self.action}: {self.why})"


@dataclass
class ResumePlan:
    """What a resume with the given parameters does.

    Attributes:
        changes: Keys that differ from the checkpoint's run.
        finished: The checkpoint has trained every epoch asked for: nothing to do.
        message: For a finished run, the line that says so.
    """

    changes: list[Change] = field(default_factory=list)
    finished: bool = False
    message: str = ""

    @property
    def replan(self) -> bool:
        """Whether the schedule and optimizer settings must be rebuilt."""
        return any(change.action == REPLANNED for change in self.changes)


def recorded_params(ckpt: Mapping[str, Any], ckpt_path: str) -> dict[str, Any] | None:
    """The parameters a checkpoint's run had: its own record, else its folder's params.json."""
    state = ckpt.get("callbacks", {}).get(RUN_INFO_KEY, {})
    if isinstance(state, Mapping) and isinstance(state.get("params"), Mapping):
        return dict(state["params"])
    folder_file = os.path.join(os.path.dirname(os.path.dirname(ckpt_path)), PARAMS_NAME)
    try:
        with open(folder_file, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    found = record.get("params") if isinstance(record, dict) else None
    return dict(found) if isinstance(found, dict) else None


def plan_resume(module: ModuleType, params: Any, ckpt_path: str) -> ResumePlan:
    """Compare ``params`` with the checkpoint's run and decide what the resume does.

    A checkpoint of another experiment is not compared (its restore names the experiment).

    Raises:
        ResumeRefusedError: If a refused key changed (all refused keys are listed), or
            ``num_epochs`` is below what the checkpoint has trained.
        CheckpointError, FileNotFoundError: If the checkpoint cannot be read.
    """
    ckpt = load_checkpoint(ckpt_path)
    plan = ResumePlan()
    origin = checkpoint_experiment(ckpt)
    if origin is not None and origin != experiment_name(module):
        return plan  # another experiment's file: restoring it reports that, by name
    old = recorded_params(ckpt, ckpt_path)
    new = params_record(params)
    if old is None:
        logger.warning(
            "%s records no run parameters (an older checkpoint): changed --set values cannot "
            "be checked and are used as given.",
            ckpt_path,
        )
    else:
        policy = {**RESUME_POLICY, **getattr(module, "RESUME_POLICY", {})}
        for key in sorted(set(old) | set(new)):
            if old.get(key) == new.get(key):
                continue
            action, why = policy.get(
                key,
                (REFUSED, "vistrain cannot tell what it changes; declare it in the experiment's "
                 "RESUME_POLICY"),
            )  # fmt: skip
            plan.changes.append(Change(key, old.get(key), new.get(key), action, why))
    refused = [change for change in plan.changes if change.action == REFUSED]
    if refused:
        listed = "; ".join(change.describe() for change in refused)
        raise ResumeRefusedError(
            f"--resume {ckpt_path} cannot continue with these changes: {listed}. Resume with "
            "the checkpoint's values, or start a new run (a new --output-dir, optionally "
            f"--set init_weights={ckpt_path})"
        )
    _check_epochs(ckpt, ckpt_path, getattr(params, "num_epochs", None), plan)
    return plan


def _check_epochs(
    ckpt: Mapping[str, Any], ckpt_path: str, num_epochs: Any, plan: ResumePlan
) -> None:
    """Refuse fewer epochs than trained; mark a run with all its epochs done as finished."""
    if not isinstance(num_epochs, int) or num_epochs < 0:
        return
    epoch = int(ckpt.get("epoch", 0))
    finished_epoch = bool(ckpt.get("epoch_finished", True))
    done = epoch + 1 if finished_epoch else epoch
    if num_epochs < done or (not finished_epoch and num_epochs <= epoch):
        trained = f"{done} epochs" + ("" if finished_epoch else f" and part of epoch {epoch}")
        raise ResumeRefusedError(
            f"--resume {ckpt_path} has trained {trained}, more than num_epochs={num_epochs}; "
            f"pass --set num_epochs={epoch + 1} or more to continue it, or test the checkpoint "
            "with vistrain test"
        )
    if finished_epoch and num_epochs == done:
        plan.finished = True
        plan.message = (
            f"{ckpt_path} has already trained all {done} epochs of this run; nothing to do "
            f"(pass --set num_epochs=N with N > {done} to train longer)."
        )


def log_changes(plan: ResumePlan, ckpt_path: str) -> None:
    """Log every changed key and what the resume does with it."""
    if not plan.changes:
        return
    logger.info("Resuming %s with %d changed setting(s):", ckpt_path, len(plan.changes))
    for change in plan.changes:
        logger.info("  %s", change.describe())


class ScheduleReplanCallback(Callback):
    """Rebuilds the LR schedules and optimizer settings of a resumed run from its new params.

    Made right after ``build`` (before the checkpoint is restored): it keeps the freshly
    built optimizer groups' hyperparameters. At the first epoch start of the resumed run
    (after the restore) it puts them back into the optimizers, keeping the restored
    optimizer state (momentum buffers), then rebuilds each schedule from its (new)
    configuration and replays it to the checkpoint's position: every step and epoch end
    already trained, in training order. The result is the learning rate a run planned with
    the new parameters from the start would have at this step.

    Args:
        optimizers: The run's optimizers, as built.
        lr_schedulers: The run's schedule wrappers, as built.
    """

    def __init__(
        self, optimizers: Sequence[Optimizer], lr_schedulers: Sequence[LRSchedulerWrapper]
    ) -> None:
        super().__init__()
        self.optimizers = list(optimizers)
        self.lr_schedulers = list(lr_schedulers)
        self.fresh_groups = [
            [
                {
                    **{key: value for key, value in group.items() if key != "params"},
                    "lr": group.get("initial_lr", group["lr"]),
                }
                for group in optimizer.param_groups
            ]
            for optimizer in self.optimizers
        ]
        self.done = False

    def on_train_epoch_start(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """Once, at the resumed run's first epoch start: re-plan (see the class docstring)."""
        if self.done:
            return
        self.done = True
        for optimizer, groups in zip(self.optimizers, self.fresh_groups):
            for group, fresh in zip(optimizer.param_groups, groups):
                group.update(fresh)
                group["initial_lr"] = fresh["lr"]
        epochs = int(trainer_state["current_epoch"])
        in_epoch = int(trainer_state.get("batches_done", 0))
        before = int(trainer_state["global_step"]) - in_epoch
        for wrapper in self.lr_schedulers:
            with warnings.catch_warnings():  # replayed steps precede optimizer steps by design
                warnings.simplefilter("ignore")
                rebuilt = LRSchedulerWrapper(wrapper.optimizer, wrapper.configs)
                replay_schedule(rebuilt, epochs, before, in_epoch)
            wrapper.schedulers = rebuilt.schedulers
        lrs = [group["lr"] for opt in self.optimizers for group in opt.param_groups]
        logger.info(
            "Re-planned the learning-rate schedule at step %d: lr %s.",
            trainer_state["global_step"],
            ", ".join(f"{lr:.6g}" for lr in lrs),
        )


def replay_schedule(
    wrapper: LRSchedulerWrapper, epochs_done: int, steps_before: int, steps_in_epoch: int
) -> None:
    """Advance a fresh ``wrapper`` as training would: steps and epoch ends, in order.

    Args:
        wrapper: A newly built schedule wrapper (at step 0).
        epochs_done: Complete epochs trained.
        steps_before: Optimizer steps of those epochs (spread evenly over them).
        steps_in_epoch: Steps already trained in the current epoch.
    """
    step = 0
    per_epoch, extra = divmod(steps_before, epochs_done) if epochs_done else (0, 0)
    for epoch in range(epochs_done):
        for _ in range(per_epoch + (1 if epoch < extra else 0)):
            step += 1
            wrapper.step_on_batch(step)
        wrapper.step(epoch)
    for _ in range(steps_in_epoch):
        step += 1
        wrapper.step_on_batch(step)


__all__ = [
    "PARAMS_NAME",
    "RESUME_POLICY",
    "Change",
    "ResumePlan",
    "ResumeRefusedError",
    "ScheduleReplanCallback",
    "log_changes",
    "params_record",
    "plan_resume",
    "recorded_params",
    "replay_schedule",
    "write_params_json",
]
