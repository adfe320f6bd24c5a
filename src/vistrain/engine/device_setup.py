"""Putting a model and its batches on the training device: compile, memory format, copies.

Both engines prepare the model the same way before training or testing:

- ``channels_last``: the model's 4-D parameters and buffers and every 4-D floating-point tensor
  of a batch (the images) are stored channels-last (NHWC). Convolutions on tensor cores run
  fastest in that layout (NVIDIA's "Deep Learning Performance" guide); on a CPU it mostly
  costs a copy per batch.
- ``compile``: the model's forward is compiled in place (``nn.Module.compile``), so the model
  stays the same object with the same parameter names: checkpoints, the EMA copy and
  ``vistrain test`` never see the ``_orig_mod.`` prefix that ``torch.compile(model)`` adds, and
  compiled and uncompiled runs resume each other's checkpoints. ``True`` uses the default
  backend (inductor, which needs a C compiler on a CPU and compiles for about a minute);
  a string names another ``torch.compile`` backend, e.g. ``"eager"`` (graph capture only,
  quick: what the CPU tests use) or ``"aot_eager"``. A model whose own class is a torch
  container (a bare ``nn.Sequential``) is not traced by in-place compilation; wrap it in a
  module of your own.
- Batches are copied to a GPU with ``non_blocking=True``; with the loader's pinned memory
  (``vistrain.data.loader`` pins when CUDA is available) the copy overlaps the host's work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def check_compile(value: Any) -> None:
    """Refuse a ``compile`` value that is neither a bool nor a ``torch.compile`` backend.

    Raises:
        TypeError: If ``value`` is neither a bool nor a string.
        ValueError: If ``value`` is a string that names no registered backend.
    """
    if isinstance(value, bool):
        return
    if not isinstance(value, str):
        raise TypeError(
            f"compile={value!r} must be True, False or the name of a torch.compile backend."
        )
    if value not in compile_backends():
        raise ValueError(
            f"compile={value!r} is not True, False or a torch.compile backend; use e.g. "
            "'inductor', 'eager', 'aot_eager' or 'cudagraphs' (all: "
            "torch._dynamo.list_backends(exclude_tags=()))."
        )


def compile_backends() -> list[str]:
    """The names of every registered ``torch.compile`` backend (``inductor``, ``eager``, ...)."""
    import torch._dynamo  # imported on demand: dynamo takes a while to import

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def check_channels_last(value: Any) -> None:
    """Refuse a ``channels_last`` value that is not a bool.

    Raises:
        TypeError: Naming the value and the choices.
    """
    if not isinstance(value, bool):
        raise TypeError(f"channels_last={value!r} must be True or False.")


def prepare_model(
    model: nn.Module, device: torch.device | None, compile: bool | str, channels_last: bool
) -> nn.Module:
    """Move ``model`` to ``device`` (None: leave it), channels-last, compiled in place.

    Returns the same ``model`` object. Compiling an already compiled model keeps its
    compiled forward (no second compilation when ``test`` follows ``fit``).
    """
    if device is not None:
        model = model.to(device)
    if channels_last:  # Module.to takes memory_format; its type stubs do not list it
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if compile is not False and getattr(model, "_compiled_call_impl", None) is None:
        model.compile(backend="inductor" if compile is True else compile)
    return model


def to_channels_last(data: Any) -> Any:
    """Every 4-D floating-point tensor in nested dicts, lists and tuples, channels-last."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 4 and data.is_floating_point():
            return data.contiguous(memory_format=torch.channels_last)
        return data
    if isinstance(data, dict):
        return {key: to_channels_last(value) for key, value in data.items()}
    if isinstance(data, list):
        return [to_channels_last(value) for value in data]
    if isinstance(data, tuple) and not hasattr(data, "_fields"):
        return tuple(to_channels_last(value) for value in data)
    return data


def move_to_device(data: Any, device: torch.device) -> Any:
    """Move every tensor in nested dicts, lists and tuples to ``device``; leave the rest.

    Copies to an accelerator are non-blocking (asynchronous from pinned memory; the
    stream orders them before the kernels that read them); copies to the CPU block, since
    the host may read the result at once.
    """
    return _move(data, device, device.type != "cpu")


def _move(data: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, dict):
        return {key: _move(value, device, non_blocking) for key, value in data.items()}
    if isinstance(data, list):
        return [_move(value, device, non_blocking) for value in data]
    if isinstance(data, tuple) and not hasattr(data, "_fields"):
        return tuple(_move(value, device, non_blocking) for value in data)
    return data


__all__ = [
    "check_channels_last",
    "check_compile",
    "compile_backends",
    "move_to_device",
    "prepare_model",
    "to_channels_last",
]
