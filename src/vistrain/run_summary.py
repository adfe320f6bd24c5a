"""The lines a finished ``vistrain fit`` prints: what it took, what it found, what to run next.

::

    Run finished in 0:12:34: runs/yolox_shapes/20261207-190000
    Best Det/AP: 0.5663 (max) at step 4000: runs/.../best.ckpt (= epoch=19-step=4000.ckpt)
    Resume: vistrain fit --config yolox_shapes --output-dir runs/... --resume
    Test:   vistrain test --config yolox_shapes --ckpt runs/.../checkpoints/best.ckpt

The commands repeat the run's ``--set`` values that differ from the experiment's defaults, so
they rebuild the same experiment. The best value comes from ``checkpoints/best.json``, which
``CheckpointCallback(monitor=...)`` writes; without it the test command names ``last.ckpt``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shlex
from types import ModuleType
from typing import Any

from vistrain.engine.callbacks.checkpoint import BEST_NAME, BEST_RECORD_NAME, LAST_NAME
from vistrain.zoo import BUILTIN_EXPERIMENTS

logger = logging.getLogger(__name__)


def config_argument(module: ModuleType) -> str:
    """What to pass to ``--config`` to load ``module``: a built-in name or the file's path."""
    for name, module_name in BUILTIN_EXPERIMENTS.items():
        if module.__name__ == module_name:
            return name
    return os.path.abspath(module.__file__ or module.__name__)


def _cli_value(value: Any) -> str:
    """A parameter value written the way ``--set KEY=VALUE`` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(_cli_value(item) for item in value)
    return str(value)


def set_arguments(module: ModuleType, params: Any) -> list[str]:
    """``--set KEY=VALUE`` for every parameter that differs from the experiment's default."""
    defaults = module.Params()
    args: list[str] = []
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if value != getattr(defaults, field.name):
            args += ["--set", f"{field.name}={_cli_value(value)}"]
    return args


def _command(*args: str) -> str:
    return " ".join(shlex.quote(arg) for arg in ("vistrain", *args))


def _read_best(checkpoint_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(checkpoint_dir, BEST_RECORD_NAME), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_summary(module: ModuleType, params: Any, output_dir: str, wall_seconds: float) -> str:
    """The end-of-run summary of a ``fit`` into ``output_dir`` (several lines).

    Args:
        module: The experiment module (``--config``).
        params: The run's parameters (a ``Params`` dataclass of ``module``).
        output_dir: The run folder.
        wall_seconds: Wall time of the whole fit.
    """
    elapsed = str(datetime.timedelta(seconds=round(max(wall_seconds, 0.0))))
    lines = [f"Run finished in {elapsed}: {output_dir}"]
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    best = _read_best(checkpoint_dir)
    best_path = os.path.join(checkpoint_dir, BEST_NAME)
    if best is not None and os.path.isfile(best_path):
        lines.append(
            f"Best {best.get('monitor')}: {float(best['value']):.4f} ({best.get('mode')}) at "
            f"step {best.get('global_step')}: {best_path} (= {best.get('file')})"
        )
        test_ckpt: str | None = best_path
    else:
        last = os.path.join(checkpoint_dir, LAST_NAME)
        test_ckpt = last if os.path.isfile(last) else None
        lines.append("No best checkpoint (no CheckpointCallback with monitor=...).")
    config = ["--config", config_argument(module), *set_arguments(module, params)]
    if os.path.isfile(os.path.join(checkpoint_dir, LAST_NAME)):
        lines.append("Resume: " + _command("fit", *config, "--output-dir", output_dir, "--resume"))
    if test_ckpt is not None:
        lines.append("Test:   " + _command("test", *config, "--ckpt", test_ckpt))
    return "\n".join(lines)


def log_run_summary(module: ModuleType, params: Any, output_dir: str, wall_seconds: float) -> None:
    """Log ``run_summary`` line by line (rank 0 logs INFO; other ranks log nothing here)."""
    for line in run_summary(module, params, output_dir, wall_seconds).splitlines():
        logger.info(line)
