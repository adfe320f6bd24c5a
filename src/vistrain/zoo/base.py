"""What an experiment is: typed parameters and a builder of everything ``fit`` needs.

An experiment is a Python module (built in, or a file passed to ``--config``) that defines:

- ``Params``: a dataclass of typed parameters with defaults (``--set KEY=VALUE`` edits them);
- ``build(params, output_dir) -> Experiment``: the model, data, loss, optimisation and callbacks;
- optionally ``DESCRIPTION``: one line shown by ``vistrain configs``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.engine.callbacks.base import Callback
from vistrain.engine.connectors import DataConnector
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import LRSchedulerWrapper


@dataclass
class Experiment:
    """Everything the trainer needs for one run.

    Attributes:
        model: The model (may contain an EMA adapter).
        loss_module: The training loss.
        optimizers: Optimizers.
        lr_schedulers: Learning-rate schedule wrappers.
        train_dataloader: Training data.
        test_dataloader: Validation / test data.
        train_data_connector: Model inputs during training.
        test_data_connector: Model inputs during testing.
        callbacks: Callbacks, in hook order.
        trainer_kwargs: Further ``Trainer`` arguments (``num_epochs``, intervals, ...).
    """

    model: nn.Module
    loss_module: LossModule
    optimizers: list[Optimizer]
    lr_schedulers: list[LRSchedulerWrapper]
    train_dataloader: DataLoader[Any] | None
    test_dataloader: DataLoader[Any] | list[DataLoader[Any]] | None
    train_data_connector: DataConnector
    test_data_connector: DataConnector
    callbacks: list[Callback]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false)")


def _convert(text: str, annotation: Any) -> Any:
    """Convert ``text`` to the type ``annotation`` names (int, float, bool, str, unions, tuples)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(text, arg)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
        item_type = args[0] if args else str
        values = [_convert(p, item_type) for p in parts]
        return tuple(values) if origin is tuple else values
    if annotation is bool:
        return _parse_bool(text)
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if annotation is float:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is not a finite number (nan and inf are refused)")
        return number
    if annotation is str:
        return text
    raise ValueError(f"parameters of type {annotation!r} cannot be set from the command line")


def param_types(params_cls: type[Any]) -> dict[str, Any]:
    """Field name to resolved type annotation of a parameter dataclass."""
    hints = typing.get_type_hints(params_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(params_cls)}


def unknown_key_message(key: str, valid_keys: list[str]) -> str:
    """One line for a mistyped ``--set`` key: the closest valid key first, then all of them.

    The suggestion comes from ``difflib`` (a ratio of matching characters, so a missing or
    swapped letter still finds the key); without a close match only the list is given.
    """
    close = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} for --set; {hint}valid keys: {', '.join(sorted(valid_keys))}"


def apply_overrides(params: Any, overrides: list[str]) -> Any:
    """Return a copy of ``params`` with ``KEY=VALUE`` overrides applied and type-checked.

    Raises:
        ValueError: For a malformed override, an unknown key (the message lists the valid
            keys) or a value of the wrong type (the message names the expected type).
    """
    types_by_name = param_types(type(params))
    changes: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in types_by_name:
            raise ValueError(unknown_key_message(key, list(types_by_name)))
        annotation = types_by_name[key]
        try:
            changes[key] = _convert(value, annotation)
        except ValueError as err:
            name = getattr(annotation, "__name__", str(annotation))
            raise ValueError(f"--set {key}={value!r}: expected {name}: {err}") from None
    updated = dataclasses.replace(params, **changes)
    check = getattr(updated, "validate", None)
    if callable(check):
        check()
    return updated
