"""The interface every visualizer implements.

A visualizer turns predictions into pictures. The ``VisualizerCallback`` drives it::

    if visualizer.should_process(cur_iter):          # cheap: no data is touched otherwise
        visualizer.process(cur_iter, **connector(outputs, batch))
        visualizer.show(cur_iter)                    # optional: a window, if there is a display
        visualizer.save_to_disk(cur_iter, folder)    # optional: files under folder
        visualizer.reset()                           # drop the drawn pictures

``cur_iter`` is the global step during training and the batch index during testing; a
visualizer acts only every ``vis_freq`` iterations.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from typing import Any


def display_available() -> bool:
    """True when a window can be opened: Windows, macOS, or a set DISPLAY / WAYLAND_DISPLAY."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class Visualizer(ABC):
    """Base class of visualizers.

    Args:
        vis_freq: Act on iterations that are a multiple of this (``cur_iter % vis_freq == 0``).

    Raises:
        TypeError: If ``vis_freq`` is not an int.
        ValueError: If ``vis_freq`` is below 1.
    """

    def __init__(self, vis_freq: int = 50) -> None:
        if isinstance(vis_freq, bool) or not isinstance(vis_freq, int):
            raise TypeError(f"vis_freq must be an int, got {vis_freq!r}.")
        if vis_freq < 1:
            raise ValueError(f"vis_freq={vis_freq} is invalid; it must be at least 1.")
        self.vis_freq = vis_freq

    def should_process(self, cur_iter: int) -> bool:
        """Whether ``process`` would draw at ``cur_iter``."""
        return cur_iter % self.vis_freq == 0

    @abstractmethod
    def process(self, cur_iter: int, *args: Any, **kwargs: Any) -> None:
        """Draw the given data if ``cur_iter`` is a visualisation iteration."""

    @abstractmethod
    def show(self, cur_iter: int, blocking: bool = True) -> None:
        """Show what was drawn, in a window when a display exists."""

    @abstractmethod
    def save_to_disk(self, cur_iter: int, output_folder: str) -> None:
        """Write what was drawn into ``output_folder``."""

    @property
    def drawn(self) -> list[tuple[str, Any]]:
        """The pictures drawn since the last ``reset()`` as (name, PIL image); none by default.

        ``VisualizerCallback`` sends these to TensorBoard's images tab.
        """
        return []

    @abstractmethod
    def reset(self) -> None:
        """Forget what was drawn (called after it has been shown or saved)."""
