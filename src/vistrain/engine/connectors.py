"""Connectors: declarative mappings from batches and predictions to function arguments.

A connector says, for every argument a component (model, loss, callback) needs, where
the value comes from: the data batch (``data_key``) or the model outputs (``pred_key``).
Keys may be dotted paths into nested dicts, namedtuples, dataclasses or lists, e.g.
``pred_key("head.boxes")`` or ``data_key("targets.0")``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, TypedDict

from vistrain.common.typing import DictData

Source = Literal["data", "prediction"]


class SourceKeyDescription(TypedDict):
    """Where one argument comes from: a key and its source."""

    key: str
    source: Source


def data_key(key: str) -> SourceKeyDescription:
    """Take the argument from the data batch at ``key`` (a dotted path is allowed)."""
    return SourceKeyDescription(key=key, source="data")


def pred_key(key: str) -> SourceKeyDescription:
    """Take the argument from the model outputs at ``key`` (a dotted path is allowed)."""
    return SourceKeyDescription(key=key, source="prediction")


def remap_pred_keys(
    mapping: Mapping[str, SourceKeyDescription], parent: str
) -> dict[str, SourceKeyDescription]:
    """Prefix every prediction key of ``mapping`` with ``parent``.

    Useful when a model's outputs are nested one level deeper than a connector expects.
    """
    out: dict[str, SourceKeyDescription] = {}
    for name, desc in mapping.items():
        if desc["source"] == "prediction":
            out[name] = pred_key(f"{parent}.{desc['key']}")
        else:
            out[name] = SourceKeyDescription(key=desc["key"], source=desc["source"])
    return out


def _available_keys(obj: Any) -> list[str]:
    if isinstance(obj, Mapping):
        return [str(k) for k in obj]
    fields = getattr(obj, "_fields", None)
    if fields is not None:
        return list(fields)
    dataclass_fields = getattr(obj, "__dataclass_fields__", None)
    if dataclass_fields is not None:
        return list(dataclass_fields)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [str(i) for i in range(len(obj))]
    return []


_MISSING = object()


def get_nested(obj: Any, key: str, what: str = "data") -> Any:
    """Resolve a (possibly dotted) ``key`` in ``obj``.

    A key present verbatim in a mapping wins over its dotted reading, so keys that
    contain dots still work. The empty key ``""`` is the whole object (for a model that
    returns a bare tensor).

    Raises:
        KeyError: If a part of the path is missing; the message names the key, the
            missing part and the keys that are there.
    """
    if not key:
        return obj
    if type(obj) is dict:  # the per-step common case, without an abstract-class check
        value = obj.get(key, _MISSING)
        if value is not _MISSING:
            return value
    elif isinstance(obj, Mapping) and key in obj:
        return obj[key]
    return _walk(obj, key, what)


def _walk(obj: Any, key: str, what: str) -> Any:
    """Follow the dotted path ``key`` part by part (see ``get_nested``)."""
    current = obj
    walked: list[str] = []
    for part in key.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif (
            isinstance(current, Sequence)
            and not isinstance(current, (str, bytes))
            and not hasattr(current, "_fields")
            and part.lstrip("-").isdigit()
            and -len(current) <= int(part) < len(current)
        ):
            current = current[int(part)]
        elif not isinstance(current, Mapping) and part in _available_keys(current):
            current = getattr(current, part)
        else:
            where = ".".join(walked) or "<root>"
            raise KeyError(
                f"Key {key!r} not found in {what}: {part!r} is missing at {where}. "
                f"Available keys there: {_available_keys(current)}."
            )
        walked.append(part)
    return current


_Plan = tuple[tuple[str, bool, str], ...]


def _plan(mapping: Mapping[str, SourceKeyDescription]) -> _Plan:
    """``(argument, from_prediction, key)`` for every entry: read once, used every step."""
    return tuple(
        (name, desc["source"] == "prediction", desc["key"]) for name, desc in mapping.items()
    )


def _check_mapping(mapping: Any, cls_name: str) -> None:
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{cls_name} expects a dict of argument name to key, got {type(mapping).__name__}."
        )
    for name, desc in mapping.items():
        if not isinstance(desc, Mapping) or "key" not in desc or "source" not in desc:
            raise TypeError(
                f"{cls_name} entry {name!r} is {desc!r}; build it with data_key() or pred_key()."
            )
        if desc["source"] not in ("data", "prediction"):
            raise ValueError(
                f"{cls_name} entry {name!r} has source {desc['source']!r}; "
                "expected 'data' or 'prediction'."
            )


class DataConnector:
    """Picks the model's inputs out of a batch.

    Args:
        key_mapping: Model argument name to batch key (a dotted path is allowed).
    """

    def __init__(self, key_mapping: Mapping[str, str]) -> None:
        self.key_mapping = key_mapping  # type: ignore[assignment]

    @property
    def key_mapping(self) -> Mapping[str, str]:
        """Model argument name to batch key (read-only view; assign a new dict to change)."""
        return MappingProxyType(self._key_mapping)

    @key_mapping.setter
    def key_mapping(self, key_mapping: Mapping[str, str]) -> None:
        if not isinstance(key_mapping, Mapping):
            raise TypeError(
                "DataConnector expects a dict of model argument to batch key, "
                f"got {type(key_mapping).__name__}."
            )
        for name, key in key_mapping.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"DataConnector entry {name!r} is {key!r}; give the batch key as a string "
                    "(a dotted path is allowed)."
                )
        self._key_mapping = dict(key_mapping)
        self._items = tuple(self._key_mapping.items())

    def __call__(self, data: DictData | list[DictData]) -> DictData | list[DictData]:
        """Return the model's keyword arguments (one dict per view for a list batch)."""
        if type(data) is list:
            return [self._one(view) for view in data]
        return self._one(data)  # type: ignore[arg-type]

    def _one(self, data: DictData) -> DictData:
        picked: DictData = {}
        for name, key in self._items:
            # get_nested's common case without its call: a key present verbatim in a dict.
            if key and type(data) is dict and key in data:
                picked[name] = data[key]
            else:
                picked[name] = get_nested(data, key, "data")
        return picked


class LossConnector:
    """Picks a loss's arguments out of predictions and data.

    Args:
        key_mapping: Loss argument name to a ``data_key`` / ``pred_key`` description.
    """

    def __init__(self, key_mapping: Mapping[str, SourceKeyDescription]) -> None:
        self.key_mapping = key_mapping  # type: ignore[assignment]

    @property
    def key_mapping(self) -> Mapping[str, SourceKeyDescription]:
        """Argument name to key description (read-only view; assign a new dict to change)."""
        return MappingProxyType(self._key_mapping)

    @key_mapping.setter
    def key_mapping(self, key_mapping: Mapping[str, SourceKeyDescription]) -> None:
        _check_mapping(key_mapping, type(self).__name__)
        self._key_mapping = dict(key_mapping)
        self._plan = _plan(self._key_mapping)

    def __call__(self, prediction: Any, data: Any) -> DictData:
        """Return the keyword arguments for the loss.

        A list batch (one dict per view) yields, for data keys, the list of each view's value.
        """
        out: DictData = {}
        for name, from_prediction, key in self._plan:
            if from_prediction:
                source, what = prediction, "predictions"
            elif type(data) is list:
                out[name] = [get_nested(view, key, "data") for view in data]
                continue
            else:
                source, what = data, "data"
            # get_nested's common cases without its call (this runs for every micro-batch):
            # the empty key (the whole object) and a key present verbatim in a dict.
            if not key:
                out[name] = source
            elif type(source) is dict and key in source:
                out[name] = source[key]
            else:
                out[name] = get_nested(source, key, what)
        return out


class CallbackConnector(LossConnector):
    """Picks a callback's arguments out of predictions and data (same rules as losses)."""
