"""Shared pytest setup: keeps CPU tests single-threaded and deterministic."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Skip tests marked ``cuda`` on a machine without a CUDA GPU (CI has none)."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
