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

With ``save_prefix`` set, the first ``tensorboard_images`` test pictures of every validation
also go to an event file in ``save_prefix`` (TensorBoard's images tab, tags ``vis/val/<k>``
with a step slider), so the same images can be compared across a run without leaving
TensorBoard.

Test pictures go to ``vis/test/step<global_step>/<image>.png``, one folder per validation,
so the same images can be compared across a run; only the newest ``keep_test_steps``
folders are kept (older ones are deleted when a new validation starts drawing), which
bounds the disk use of long runs.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from typing import Any

from torch import nn

from vistrain.common.checks import check_positive_int
from vistrain.common.distributed import is_rank_zero
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.event_file import ScalarEventWriter
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
        tensorboard_images: Also send this many test pictures per validation to TensorBoard
            (an event file in ``save_prefix``; 0 = none, nothing without ``save_prefix``).
        **kwargs: Passed to ``Callback`` (``train_connector``, ``test_connector``).

    Raises:
        TypeError: If ``visualizer`` is not a ``Visualizer``.
        ValueError: If ``save_to_disk`` is set without ``save_prefix``, a needed connector
            is missing, ``keep_test_steps`` is below 1 or ``tensorboard_images`` below 0.
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
        tensorboard_images: int = 8,
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
        check_positive_int("tensorboard_images", tensorboard_images, {0: "none"})
        self.tensorboard_images = tensorboard_images if save_prefix is not None else 0
        self._events: ScalarEventWriter | None = None
        self._tb_sent = 0  # pictures sent in the current validation
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

    def _visualize(
        self, cur_iter: int, inputs: DictData, folder: str, tb_step: int | None = None
    ) -> None:
        self.visualizer.process(cur_iter, **inputs)
        if self.show:
            self.visualizer.show(cur_iter)
        if self.save_to_disk:
            self.visualizer.save_to_disk(cur_iter, folder)
        if tb_step is not None and self._tb_sent < self.tensorboard_images:
            self._send_to_tensorboard(tb_step)
        self.visualizer.reset()

    def _send_to_tensorboard(self, step: int) -> None:
        """Send drawn pictures (up to the validation's budget) to the images tab."""
        pictures = self.visualizer.drawn[: self.tensorboard_images - self._tb_sent]
        if not pictures or self.save_prefix is None:
            return
        encoded = []
        for _, image in pictures:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            tag = f"vis/val/{self._tb_sent}"
            encoded.append((tag, buffer.getvalue(), image.height, image.width))
            self._tb_sent += 1
        if self._events is None:
            self._events = ScalarEventWriter(self.save_prefix)
        self._events.add_png_images(encoded, step, time.time())

    def on_test_epoch_start(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """A new validation: its own budget of TensorBoard pictures."""
        self._tb_sent = 0

    def on_fit_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Close the picture event file."""
        if self._events is not None:
            self._events.close()
            self._events = None

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
        self._visualize(batch_idx, inputs, folder, tb_step=trainer_state["global_step"])
