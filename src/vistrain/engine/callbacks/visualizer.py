"""Pictures of predictions during training and testing.

Where it sits in the loop::

    setup()               rank 0 creates <save_prefix>/vis/train and <save_prefix>/vis/test
    on_train_batch_end    if visualize_train and visualizer.should_process(global_step):
                              rank 0 draws train_connector(outputs, batch), shows/saves, resets
    on_test_batch_end     if visualizer.should_process(batch_idx):
                              rank 0 draws test_connector(outputs, batch), shows/saves, resets

Only rank 0 draws and writes: the other ranks return at once, so the callback never calls a
collective. Steps that are not visualisation steps cost one modulo, nothing else. Test
pictures are named after their images and overwritten by each validation, so the folder
always holds the latest ones.
"""

from __future__ import annotations

import os
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
        **kwargs: Passed to ``Callback`` (``train_connector``, ``test_connector``).

    Raises:
        TypeError: If ``visualizer`` is not a ``Visualizer``.
        ValueError: If ``save_to_disk`` is set without ``save_prefix``, or a needed
            connector is missing.
    """

    def __init__(
        self,
        *args: Any,
        visualizer: Visualizer,
        visualize_train: bool = False,
        show: bool = False,
        save_to_disk: bool = True,
        save_prefix: str | None = None,
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
        self.visualizer = visualizer
        self.visualize_train = visualize_train
        self.show = show
        self.save_to_disk = save_to_disk
        self.save_prefix = save_prefix
        base = os.path.join(save_prefix, "vis") if save_prefix is not None else "vis"
        self.train_folder = os.path.join(base, "train")
        self.test_folder = os.path.join(base, "test")

    def setup(self) -> None:
        """Create the output folders once (rank 0)."""
        if self.save_to_disk and is_rank_zero():
            os.makedirs(self.train_folder, exist_ok=True)
            os.makedirs(self.test_folder, exist_ok=True)

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
        """Draw the test batch every ``vis_freq`` batches (rank 0)."""
        if self.test_connector is None:
            return
        if not self.visualizer.should_process(batch_idx) or not is_rank_zero():
            return
        inputs = self.get_test_callback_inputs(outputs, batch)
        self._visualize(batch_idx, inputs, self.test_folder)
