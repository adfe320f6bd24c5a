"""Pictures of predictions during training and testing.

Where it sits in the loop::

    on_train_batch_end    if visualize_train and visualizer.should_process(global_step):
                              rank 0 draws train_connector(outputs, batch), shows/saves, resets
    on_test_batch_end     if visualizer.should_process(batch_idx):
                              rank 0 draws test_connector(outputs, batch), shows/saves, resets

Only rank 0 draws and writes: the other ranks return at once, so the callback never calls a
collective. Steps that are not visualisation steps cost one modulo, nothing else. Folders
are made when the first picture goes into them, so a run that draws nothing (a test has no
training pictures) leaves no empty folder.

Test pictures go to ``vis/test/step<global_step>/<image>.png``, one folder per validation,
so the same images can be compared across a run; only the newest ``keep_test_steps``
folders are kept (older ones are deleted when a new validation starts drawing), which
bounds the disk use of long runs.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from torch import nn

from vistrain.common.distributed import is_rank_zero
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.loss_module import LossModule
from vistrain.vis.base import Visualizer


class VisualizerCallback(Callback):
    """Callback for model visualization.

    Args:
        *args: Passed to ``Callback``.
        visualizer: The visualizer that draws (e.g. ``BoundingBoxVisualizer``).
        visualize_train: Also draw training batches (needs ``train_connector``).
        show: Show pictures in a window (skipped with a warning without a display).
        save_to_disk: Write pictures under ``<save_prefix>/vis/{train,test}/``.
        save_prefix: Output directory of the run; required when ``save_to_disk``.
        keep_test_steps: Keep the test pictures of this many validations (the newest).
        **kwargs: Passed to ``Callback`` (``train_connector``, ``test_connector``).

    Raises:
        TypeError: If ``visualizer`` is not a ``Visualizer``.
        ValueError: If ``save_to_disk`` is set without ``save_prefix``, a needed connector
            is missing or ``keep_test_steps`` is below 1.
    """

    def __init__(
        self,
        *args: Any,
        visualizer: Visualizer,
        visualize_train: bool = False,
        show: bool = False,
        save_to_disk: bool = True,
        save_prefix: str | None = None,
        keep_test_steps: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(visualizer, Visualizer):
            raise TypeError(
                f"visualizer must be a vistrain.vis.base.Visualizer, got "
                f"{type(visualizer).__name__}."
            )
        if save_to_disk and save_prefix is None:
            raise ValueError(
                "VisualizerCallback(save_to_disk=True) needs save_prefix (the run's output "
                "folder); pass save_prefix=... or save_to_disk=False."
            )
        if visualize_train and self.train_connector is None:
            raise ValueError(
                "VisualizerCallback(visualize_train=True) needs train_connector="
                "CallbackConnector({...}) to pick its inputs from training batches."
            )
        if not visualize_train and self.test_connector is None:
            raise ValueError(
                "VisualizerCallback has nothing to draw: pass test_connector="
                "CallbackConnector({...}), or visualize_train=True with a train_connector."
            )
        if isinstance(keep_test_steps, bool) or not isinstance(keep_test_steps, int):
            raise TypeError(f"keep_test_steps must be an int, got {keep_test_steps!r}.")
        if keep_test_steps < 1:
            raise ValueError(f"keep_test_steps={keep_test_steps} must be >= 1.")
        self.visualizer = visualizer
        self.visualize_train = visualize_train
        self.show = show
        self.save_to_disk = save_to_disk
        self.save_prefix = save_prefix
        base = os.path.join(save_prefix, "vis") if save_prefix is not None else "vis"
        self.train_folder = os.path.join(base, "train")
        self.test_folder = os.path.join(base, "test")
        self.keep_test_steps = keep_test_steps
        self._step_folder: str | None = None

    def test_step_folder(self, global_step: int) -> str:
        """Folder of the test pictures drawn at ``global_step``."""
        return os.path.join(self.test_folder, f"step{global_step:07d}")

    def _start_test_step_folder(self, folder: str) -> None:
        """Delete the oldest step folders so that, with ``folder``, ``keep_test_steps`` remain."""
        self._step_folder = folder
        if not self.save_to_disk or not os.path.isdir(self.test_folder):
            return
        pattern = re.compile(r"step(\d+)")
        older = sorted(
            (int(match.group(1)), name)
            for name in os.listdir(self.test_folder)
            if (match := pattern.fullmatch(name)) and os.path.join(self.test_folder, name) != folder
        )
        for _, name in older[: max(0, len(older) - (self.keep_test_steps - 1))]:
            shutil.rmtree(os.path.join(self.test_folder, name), ignore_errors=True)

    def _visualize(self, cur_iter: int, inputs: DictData, folder: str) -> None:
        self.visualizer.process(cur_iter, **inputs)
        if self.show:
            self.visualizer.show(cur_iter)
        if self.save_to_disk:
            self.visualizer.save_to_disk(cur_iter, folder)
        self.visualizer.reset()

    def on_train_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
    ) -> MetricLogs | None:
        """Draw the training batch every ``vis_freq`` global steps (rank 0, if enabled)."""
        if not self.visualize_train:
            return None
        cur_iter = trainer_state["global_step"]
        if not self.visualizer.should_process(cur_iter) or not is_rank_zero():
            return None
        inputs = self.get_train_callback_inputs(outputs, batch)
        self._visualize(cur_iter, inputs, self.train_folder)
        return None

    def on_test_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Draw the test batch every ``vis_freq`` batches into this step's folder (rank 0)."""
        if self.test_connector is None:
            return
        if not self.visualizer.should_process(batch_idx) or not is_rank_zero():
            return
        folder = self.test_step_folder(trainer_state["global_step"])
        if folder != self._step_folder:
            self._start_test_step_folder(folder)
        inputs = self.get_test_callback_inputs(outputs, batch)
        self._visualize(batch_idx, inputs, folder)
