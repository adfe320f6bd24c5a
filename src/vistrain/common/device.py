"""Checking a requested device before anything is built on it."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``device``, refused early when this machine cannot run it.

    A typo or a GPU that is not there would otherwise surface later, deep inside the
    first ``model.to(device)``, after data and callbacks were set up.

    Raises:
        ValueError: If ``device`` is not a device name, or names a CUDA device that is not
            available (no CUDA build, no GPU, or an index past the last GPU) or an MPS
            device on a machine without MPS.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device={device!r} is not a device; use 'cpu', 'cuda', 'cuda:<index>' or 'mps'."
        ) from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} asks for a CUDA GPU but none is available here "
                "(torch.cuda.is_available() is False); use device='cpu'."
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device={device!r} asks for GPU {resolved.index} but this machine has {count} "
                f"(indices 0..{count - 1})."
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} asks for MPS, which is not available; use 'cpu'.")
    return resolved
