"""What a run records about itself in its checkpoints: the experiment that made it.

A checkpoint's weights only say which layers it holds; when it is handed to another
experiment (``vistrain test --config toy_classifier --ckpt <a yolox_shapes checkpoint>``)
the useful message is "this comes from yolox_shapes", not a list of missing keys. The
``vistrain.run`` adds ``RunInfoCallback`` to every run; its state, like any callback's, is saved in
each checkpoint under the callback's class name, so no checkpoint writer needs to know it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vistrain import __version__
from vistrain.engine.callbacks.base import Callback

RUN_INFO_KEY = "RunInfoCallback"
"""Key of ``RunInfoCallback``'s state in a checkpoint's ``callbacks`` dict."""


class RunInfoCallback(Callback):
    """Saves the experiment name, its parameters and the vistrain version in every checkpoint.

    Args:
        experiment: Name of the experiment (built-in name or config file stem).
        params: The run's parameters as JSON values (``run_params.params_record``), which
            ``--resume`` compares its own with; None records none.
    """

    def __init__(self, experiment: str, params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.experiment = experiment
        self.params = None if params is None else dict(params)

    def state_dict(self) -> dict[str, Any]:
        """The experiment name, parameters and vistrain version that wrote the checkpoint."""
        state: dict[str, Any] = {"experiment": self.experiment, "vistrain_version": __version__}
        if self.params is not None:
            state["params"] = self.params
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the resuming run's own name is what its checkpoints record."""


def checkpoint_experiment(ckpt: Mapping[str, Any]) -> str | None:
    """The experiment that wrote ``ckpt`` (a loaded checkpoint dict); None when unrecorded."""
    state = ckpt.get("callbacks", {}).get(RUN_INFO_KEY, {})
    name = state.get("experiment") if isinstance(state, Mapping) else None
    return name if isinstance(name, str) else None


def experiment_name(module: Any) -> str:
    """Name of an experiment module: its file's stem (``yolox_shapes``, ``my_exp``)."""
    path = getattr(module, "__file__", None)
    if not path:
        return str(module.__name__).rsplit(".", 1)[-1]
    return os.path.splitext(os.path.basename(path))[0]


__all__ = ["RUN_INFO_KEY", "RunInfoCallback", "checkpoint_experiment", "experiment_name"]
