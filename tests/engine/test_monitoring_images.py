"""The visualizer's test pictures in TensorBoard's images tab, read back with TensorBoard."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vistrain.engine.callbacks.visualizer import VisualizerCallback
from vistrain.engine.connectors import CallbackConnector, data_key, pred_key
from vistrain.vis.image import BoundingBoxVisualizer

CONNECTOR = CallbackConnector(
    {
        "images": data_key("original_images"),
        "image_names": data_key("sample_names"),
        "boxes": pred_key("boxes"),
        "class_ids": pred_key("class_ids"),
    }
)


def _batch(first: int, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    batch = {
        "original_images": [np.full((20, 30, 3), 40 * i, dtype=np.uint8) for i in range(n)],
        "sample_names": [f"img{first + i}" for i in range(n)],
    }
    outputs = {
        "boxes": [torch.tensor([[2.0, 2.0, 12.0, 12.0]]) for _ in range(n)],
        "class_ids": [torch.tensor([1]) for _ in range(n)],
    }
    return batch, outputs


def _validate(callback: VisualizerCallback, step: int, batches: int) -> None:
    state: Any = {"current_epoch": 0, "global_step": step}
    callback.on_test_epoch_start(state, torch.nn.Identity())
    for batch_idx in range(batches):
        batch, outputs = _batch(3 * batch_idx, 3)
        callback.on_test_batch_end(state, torch.nn.Identity(), outputs, batch, batch_idx)


def test_a_bounded_number_of_pictures_per_validation_reaches_the_images_tab(tmp_path) -> None:
    callback = VisualizerCallback(
        visualizer=BoundingBoxVisualizer(vis_freq=1),
        test_connector=CONNECTOR,
        save_prefix=str(tmp_path),
        tensorboard_images=4,
    )
    _validate(callback, step=10, batches=3)  # 9 pictures drawn, 4 sent
    _validate(callback, step=20, batches=1)  # 3 drawn, all sent
    callback.on_fit_end({}, torch.nn.Identity())  # type: ignore[typeddict-item]
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    tags = sorted(events.Tags()["images"])
    assert tags == ["vis/val/0", "vis/val/1", "vis/val/2", "vis/val/3"]
    assert [e.step for e in events.Images("vis/val/0")] == [10, 20]
    assert [e.step for e in events.Images("vis/val/3")] == [10]
    first = events.Images("vis/val/0")[0]
    picture = Image.open(io.BytesIO(first.encoded_image_string))
    assert (first.width, first.height) == picture.size and picture.width >= 30
    # The picture is the one written to disk for the same image.
    on_disk = Image.open(tmp_path / "vis" / "test" / "step0000010" / "img0.png").convert("RGB")
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(on_disk))


def test_tensorboard_images_argument_is_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="tensorboard_images"):
        VisualizerCallback(
            visualizer=BoundingBoxVisualizer(),
            test_connector=CONNECTOR,
            save_prefix=str(tmp_path),
            tensorboard_images=-1,
        )
