from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dist_utils import run_distributed
from vistrain.engine.callbacks.visualizer import VisualizerCallback
from vistrain.engine.connectors import CallbackConnector, data_key, pred_key
from vistrain.vis.image import BoundingBoxVisualizer, class_color

CONNECTOR = CallbackConnector(
    {
        "images": data_key("original_images"),
        "image_names": data_key("sample_names"),
        "boxes": pred_key("boxes"),
        "scores": pred_key("scores"),
        "class_ids": pred_key("class_ids"),
    }
)
GT_CONNECTOR = CallbackConnector(
    {
        "images": data_key("original_images"),
        "image_names": data_key("sample_names"),
        "boxes": data_key("boxes2d"),
        "class_ids": data_key("boxes2d_classes"),
    }
)


def make_batch(names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    n = len(names)
    batch = {
        "original_images": [np.zeros((40, 50, 3), dtype=np.uint8) for _ in range(n)],
        "sample_names": names,
        "boxes2d": [torch.tensor([[5.0, 20.0, 30.0, 35.0]]) for _ in range(n)],
        "boxes2d_classes": [torch.tensor([1]) for _ in range(n)],
    }
    outputs = {
        "boxes": [torch.tensor([[5.0, 20.0, 30.0, 35.0]]) for _ in range(n)],
        "scores": [torch.tensor([0.8]) for _ in range(n)],
        "class_ids": [torch.tensor([3]) for _ in range(n)],
    }
    return batch, outputs


def state(global_step: int = 0) -> dict[str, Any]:
    return {"current_epoch": 0, "num_epochs": 1, "global_step": global_step, "num_steps": -1}


def test_save_prefix_required_when_saving(tmp_path: Path) -> None:
    vis = BoundingBoxVisualizer()
    with pytest.raises(ValueError, match="save_prefix"):
        VisualizerCallback(visualizer=vis, test_connector=CONNECTOR)
    VisualizerCallback(visualizer=vis, test_connector=CONNECTOR, save_to_disk=False)
    with pytest.raises(TypeError, match="Visualizer"):
        VisualizerCallback(visualizer=object(), save_prefix=str(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train_connector"):
        VisualizerCallback(visualizer=vis, visualize_train=True, save_prefix=str(tmp_path))
    with pytest.raises(ValueError, match="nothing to draw"):
        VisualizerCallback(visualizer=vis, save_prefix=str(tmp_path))


def test_test_pictures_every_vis_freq_batches(tmp_path: Path) -> None:
    vis = BoundingBoxVisualizer(vis_freq=2, min_size=0)
    callback = VisualizerCallback(
        visualizer=vis, test_connector=CONNECTOR, save_prefix=str(tmp_path)
    )
    callback.setup()
    assert not (tmp_path / "vis").exists()  # folders appear with their first picture
    for batch_idx in range(4):
        batch, outputs = make_batch([f"b{batch_idx}_0", f"b{batch_idx}_1"])
        callback.on_test_batch_end(state(12), None, outputs, batch, batch_idx)  # type: ignore[arg-type]
        assert vis.drawn == []  # reset after saving
    assert os.listdir(tmp_path / "vis") == ["test"]  # no empty train folder
    step_folder = tmp_path / "vis" / "test" / "step0000012"
    files = sorted(os.listdir(step_folder))
    assert files == ["b0_0.png", "b0_1.png", "b2_0.png", "b2_1.png"]
    picture = np.asarray(Image.open(step_folder / "b2_1.png"))
    assert picture[28, 5].tolist() == list(class_color(3))  # left edge, predicted class
    assert picture[28, 15].tolist() == [0, 0, 0]


def test_train_pictures_follow_global_step(tmp_path: Path) -> None:
    vis = BoundingBoxVisualizer(vis_freq=3, min_size=0)
    callback = VisualizerCallback(
        visualizer=vis,
        visualize_train=True,
        train_connector=GT_CONNECTOR,
        test_connector=CONNECTOR,
        save_prefix=str(tmp_path),
    )
    callback.setup()
    for step in range(1, 8):
        batch, outputs = make_batch([f"s{step}"])
        # batch_idx restarts each epoch; the global step decides.
        callback.on_train_batch_end(state(step), None, None, outputs, batch, step % 2)  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path / "vis" / "train")) == ["s3.png", "s6.png"]
    picture = np.asarray(Image.open(tmp_path / "vis" / "train" / "s3.png"))
    assert picture[28, 5].tolist() == list(class_color(1))  # ground-truth class


def test_train_pictures_off_by_default(tmp_path: Path) -> None:
    vis = BoundingBoxVisualizer(vis_freq=1)
    callback = VisualizerCallback(
        visualizer=vis,
        train_connector=GT_CONNECTOR,
        test_connector=CONNECTOR,
        save_prefix=str(tmp_path),
    )
    callback.setup()
    batch, outputs = make_batch(["x"])
    assert callback.on_train_batch_end(state(1), None, None, outputs, batch, 0) is None  # type: ignore[arg-type]
    assert not (tmp_path / "vis").exists()


def _validate(callback: VisualizerCallback, step: int, names: list[str]) -> None:
    batch, outputs = make_batch(names)
    callback.on_test_batch_end(state(step), None, outputs, batch, 0)  # type: ignore[arg-type]


def test_each_validation_keeps_its_pictures_up_to_a_bound(tmp_path: Path) -> None:
    callback = VisualizerCallback(
        visualizer=BoundingBoxVisualizer(vis_freq=1),
        test_connector=CONNECTOR,
        save_prefix=str(tmp_path),
        keep_test_steps=3,
    )
    test_dir = tmp_path / "vis" / "test"
    for step in (10, 20, 30):
        _validate(callback, step, ["img"])
    assert sorted(os.listdir(test_dir)) == ["step0000010", "step0000020", "step0000030"]
    _validate(callback, 30, ["other"])  # a later batch of the same validation: same folder
    assert sorted(os.listdir(test_dir / "step0000030")) == ["img.png", "other.png"]
    for step in (40, 50):  # each new validation drops the oldest beyond the bound
        _validate(callback, step, ["img"])
    assert sorted(os.listdir(test_dir)) == ["step0000030", "step0000040", "step0000050"]
    # a new callback (a resumed run) counts the folders already on disk
    resumed = VisualizerCallback(
        visualizer=BoundingBoxVisualizer(vis_freq=1),
        test_connector=CONNECTOR,
        save_prefix=str(tmp_path),
        keep_test_steps=3,
    )
    _validate(resumed, 60, ["img"])
    assert sorted(os.listdir(test_dir)) == ["step0000040", "step0000050", "step0000060"]
    with pytest.raises(ValueError, match="keep_test_steps"):
        VisualizerCallback(
            visualizer=BoundingBoxVisualizer(),
            test_connector=CONNECTOR,
            save_prefix=str(tmp_path),
            keep_test_steps=0,
        )


def test_show_only_does_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    vis = BoundingBoxVisualizer(vis_freq=1)
    shown: list[int] = []
    monkeypatch.setattr(vis, "show", lambda cur_iter, blocking=True: shown.append(cur_iter))
    callback = VisualizerCallback(
        visualizer=vis, test_connector=CONNECTOR, show=True, save_to_disk=False
    )
    callback.setup()
    batch, outputs = make_batch(["y"])
    callback.on_test_batch_end(state(), None, outputs, batch, 4)  # type: ignore[arg-type]
    assert shown == [4]
    assert vis.drawn == []
    assert os.listdir(tmp_path) == []  # nothing written, not even folders


def _two_ranks_write(rank: int, world_size: int, prefix: str) -> list[str]:
    callback = VisualizerCallback(
        visualizer=BoundingBoxVisualizer(vis_freq=1), test_connector=CONNECTOR, save_prefix=prefix
    )
    callback.setup()
    batch, outputs = make_batch([f"rank{rank}_a", f"rank{rank}_b"])
    callback.on_test_batch_end(state(), None, outputs, batch, 0)  # type: ignore[arg-type]
    if rank != 0:
        return []
    return sorted(os.listdir(os.path.join(prefix, "vis", "test", "step0000000")))


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    results = run_distributed(_two_ranks_write, 2, str(tmp_path))
    assert os.listdir(tmp_path / "vis" / "test") == ["step0000000"]
    assert sorted(os.listdir(tmp_path / "vis" / "test" / "step0000000")) == [
        "rank0_a.png",
        "rank0_b.png",
    ]
    assert results == [["rank0_a.png", "rank0_b.png"], []]
