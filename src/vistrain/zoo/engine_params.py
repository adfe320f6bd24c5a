"""The ``--set`` keys every built-in experiment shares for the engine's step options.

Each built-in ``Params`` dataclass derives from :class:`EngineParams`, so ``--set
precision=bf16-mixed`` (and the others) work the same for every experiment, are checked
when the parameters are (before anything is built), and reach the ``Trainer`` through the
experiment's ``trainer_kwargs``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vistrain.engine.device_setup import check_channels_last, check_compile
from vistrain.engine.optimizer_step import check_step_options


@dataclass
class EngineParams:
    """Step and device options of a run (``--set KEY=VALUE``); the defaults are the Trainer's.

    Attributes:
        precision: ``32`` (full precision), ``bf16-mixed`` or ``16-mixed`` (autocast; fp16
            also scales the loss).
        accumulate_grad_batches: Batches whose gradients are summed into one optimizer step.
        gradient_clip_val: Clip the gradients at this value (none = no clipping).
        gradient_clip_algorithm: ``norm`` (the total 2-norm) or ``value`` (each element).
        compile: ``torch.compile`` the model: true (inductor), false, or a backend name
            (e.g. ``eager``).
        channels_last: Model and image batches in the channels-last memory format.
    """

    precision: str = "32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    compile: bool | str = False
    channels_last: bool = False

    def validate_engine_options(self) -> None:
        """Raise ValueError naming the first engine option no run can use, and the choices."""
        check_step_options(
            self.precision,
            self.accumulate_grad_batches,
            self.gradient_clip_val,
            self.gradient_clip_algorithm,
        )
        try:
            check_compile(self.compile)
            check_channels_last(self.channels_last)
        except TypeError as err:
            raise ValueError(str(err)) from None

    def engine_trainer_kwargs(self) -> dict[str, Any]:
        """The engine options that differ from the Trainer's defaults, as Trainer arguments.

        Only changed values are passed, so an experiment run with the defaults builds the
        same ``Trainer`` call as before these options existed.
        """
        defaults = EngineParams()
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(EngineParams)
            if getattr(self, field.name) != getattr(defaults, field.name)
        }


__all__ = ["EngineParams"]
