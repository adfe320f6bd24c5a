from __future__ import annotations

import io
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dist_utils import run_distributed
from trainer_fixtures import run_toy
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.yolox_callbacks import YOLOXSyncRandomResizeCallback
from vistrain.engine.checkpoint_io import save_checkpoint
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule
from vistrain.engine.trainer import Trainer

SIZES = [(32, 32), (48, 64), (64, 48), (40, 40)]


def make_batch(h: int = 16, w: int = 24) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(h * 100 + w)
    return {
        "images": torch.rand(2, 3, h, w, generator=gen),
        "input_hw": [(h, w), (h - 4, w - 6)],  # the second image is padded in the batch
        "boxes2d": [
            torch.tensor([[1.0, 2.0, 9.0, 10.0]]),
            torch.tensor([[0.0, 0.0, 4.0, 6.0], [2.0, 3.0, 5.0, 7.0]]),
        ],
        "boxes2d_classes": [torch.tensor([0]), torch.tensor([1, 2])],
    }


def state(global_step: int) -> Any:
    return {"global_step": global_step, "current_epoch": 0}


def run_steps(cb: YOLOXSyncRandomResizeCallback, steps: range) -> list[tuple[int, int]]:
    """The image size of each step's batch after the hook."""
    sizes = []
    for step in steps:
        batch = make_batch()
        cb.on_train_batch_start(state(step), nn.Identity(), None, batch, step)  # type: ignore[arg-type]
        sizes.append(tuple(batch["images"].shape[-2:]))
    return sizes


def test_size_sequence_starts_at_last_entry_and_draws_every_interval() -> None:
    cb = YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=3, seed=7)
    assert cb.size == (40, 40)
    sizes = run_steps(cb, range(30))
    assert sizes[:2] == [(40, 40), (40, 40)]  # before the first draw (at global_step 2)
    rng = random.Random(7)
    expected, current = [], SIZES[-1]
    for step in range(30):
        if (step + 1) % 3 == 0:
            current = rng.choice(SIZES)
        expected.append(current)
    assert sizes == expected
    for start in range(2, 30, 3):  # constant between draws
        assert len(set(sizes[start : start + 3])) == 1
    assert len(set(sizes)) >= 3  # really random, not stuck
    assert cb.size == sizes[-1]


def test_images_boxes_and_input_hw_are_scaled() -> None:
    cb = YOLOXSyncRandomResizeCallback(size_list=[(24, 48)], interval=1)
    batch = make_batch(16, 24)
    original = {k: list(v) if isinstance(v, list) else v.clone() for k, v in batch.items()}
    cb.on_train_batch_start(state(0), nn.Identity(), None, batch, 0)  # type: ignore[arg-type]
    expected = F.interpolate(
        original["images"], size=(24, 48), mode="bilinear", align_corners=False
    )
    assert torch.equal(batch["images"], expected)
    assert batch["input_hw"] == [(24, 48), (18, 36)]  # scaled by (1.5, 2)
    torch.testing.assert_close(batch["boxes2d"][0], torch.tensor([[2.0, 3.0, 18.0, 15.0]]))
    torch.testing.assert_close(
        batch["boxes2d"][1], torch.tensor([[0.0, 0.0, 8.0, 9.0], [4.0, 4.5, 10.0, 10.5]])
    )
    assert torch.equal(original["boxes2d"][0], torch.tensor([[1.0, 2.0, 9.0, 10.0]]))  # not mutated
    assert batch["boxes2d_classes"][1].tolist() == [1, 2]


def test_batch_already_at_size_is_left_untouched() -> None:
    cb = YOLOXSyncRandomResizeCallback(size_list=[(16, 24)], interval=5)
    batch = make_batch(16, 24)
    images, boxes = batch["images"], batch["boxes2d"]
    cb.on_train_batch_start(state(4), nn.Identity(), None, batch, 0)  # type: ignore[arg-type]
    assert batch["images"] is images and batch["boxes2d"] is boxes


def test_every_view_of_a_list_batch_is_resized() -> None:
    cb = YOLOXSyncRandomResizeCallback(size_list=[(32, 48)], interval=1)
    views = [make_batch(16, 24), make_batch(8, 12)]
    cb.on_train_batch_start(state(0), nn.Identity(), None, views, 0)  # type: ignore[arg-type]
    assert [tuple(v["images"].shape) for v in views] == [(2, 3, 32, 48)] * 2
    assert views[0]["input_hw"][0] == (32, 48) and views[1]["input_hw"][0] == (32, 48)
    torch.testing.assert_close(views[1]["boxes2d"][0], torch.tensor([[4.0, 8.0, 36.0, 40.0]]))


def test_tensor_input_hw_is_scaled() -> None:
    cb = YOLOXSyncRandomResizeCallback(size_list=[(32, 48)], interval=1)
    batch = make_batch(16, 24)
    batch["input_hw"] = torch.tensor([[16, 24], [12, 18]])
    cb.on_train_batch_start(state(0), nn.Identity(), None, batch, 0)  # type: ignore[arg-type]
    assert batch["input_hw"].tolist() == [[32, 48], [24, 36]]
    assert batch["input_hw"].dtype == torch.int64


def test_state_round_trip_resumes_the_same_sizes() -> None:
    straight = YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=2, seed=3)
    first = run_steps(straight, range(9))
    saved = straight.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    rest_straight = run_steps(straight, range(9, 40))

    resumed = YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=2, seed=3)
    resumed.load_state_dict(loaded)
    assert resumed.size == first[-1]
    assert run_steps(resumed, range(9, 40)) == rest_straight
    # A fresh callback without the state would not continue the same way.
    assert (
        run_steps(YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=2, seed=3), range(9, 40))
        != rest_straight
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size_list is empty"):
        YOLOXSyncRandomResizeCallback(size_list=[], interval=1)
    for interval in (0, -3):
        with pytest.raises(ValueError, match="interval"):
            YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=interval)
    with pytest.raises(TypeError, match="interval"):
        YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=1.5)  # type: ignore[arg-type]
    for bad in ([(32,)], [(32, 0)], [(32, 32.5)], [32]):
        with pytest.raises(ValueError, match="size_list entry"):
            YOLOXSyncRandomResizeCallback(size_list=bad, interval=1)  # type: ignore[arg-type]
    cb = YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=1)
    with pytest.raises(ValueError, match="missing"):
        cb.load_state_dict({"size": [32, 32]})


def _synced_sizes(rank: int, world_size: int) -> list[tuple[int, int]]:
    # Each rank seeds differently: only the broadcast keeps them together.
    cb = YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=2, seed=rank)
    return run_steps(cb, range(24))


def test_two_ranks_train_at_the_same_sizes() -> None:
    r0, r1 = run_distributed(_synced_sizes, 2)
    assert r0 == r1
    single = YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=2, seed=0)
    assert r0 == run_steps(single, range(24))  # rank 0's draws
    assert len(set(r0)) >= 2


class ShapeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(tuple(images.shape[-2:]))
        return {"pred": images.mean(dim=(1, 2, 3)) * self.scale}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": torch.stack([s["images"] for s in samples]),
        "input_hw": [s["input_hw"] for s in samples],
        "boxes2d": [s["boxes2d"] for s in samples],
        "target": torch.zeros(len(samples)),
    }


def test_native_trainer_feeds_resized_images_to_the_model(tmp_path) -> None:
    samples = [
        {"images": torch.rand(3, 16, 16), "input_hw": (16, 16), "boxes2d": torch.zeros(0, 4)}
        for _ in range(8)
    ]
    loader = DataLoader(samples, batch_size=2, collate_fn=_collate)  # type: ignore[arg-type]
    cb = YOLOXSyncRandomResizeCallback(size_list=[(24, 24), (32, 32)], interval=2, seed=1)
    trainer = Trainer(
        device="cpu",
        output_dir=str(tmp_path),
        train_dataloader=loader,
        test_dataloader=None,
        train_data_connector=DataConnector({"images": "images"}),
        test_data_connector=DataConnector({"images": "images"}),
        callbacks=[cb],
        num_epochs=2,
        tensorboard=False,
    )
    model = ShapeModel()
    losses = LossModule(
        [
            {
                "loss": lambda pred, target: ((pred - target) ** 2).mean(),
                "connector": LossConnector(
                    {"pred": pred_key("pred"), "target": data_key("target")}
                ),
            }
        ]
    )
    trainer.fit(model, [torch.optim.SGD(model.parameters(), lr=0.1)], None, losses)
    expected = run_steps(
        YOLOXSyncRandomResizeCallback(size_list=[(24, 24), (32, 32)], interval=2, seed=1), range(8)
    )
    assert model.seen == expected and model.seen[0] == (32, 32)


def run_windows(
    cb: YOLOXSyncRandomResizeCallback, steps: range, window: int
) -> list[tuple[int, int]]:
    """As ``run_steps``, with ``window`` micro-batches per step (``global_step`` stays put)."""
    sizes = []
    for step in steps:
        for micro in range(window):
            batch = make_batch()
            cb.on_train_batch_start(state(step), nn.Identity(), None, batch, micro)  # type: ignore[arg-type]
            sizes.append(tuple(batch["images"].shape[-2:]))
    return sizes


def test_micro_batches_of_one_step_share_the_size_drawn_once() -> None:
    """Under accumulation the batch hook runs per micro-batch: one draw per step, not per
    micro-batch (a draw per micro-batch would change the size inside a window and advance
    the generator k times)."""
    accumulated = run_windows(
        YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=1), range(20), 3
    )
    plain = run_steps(YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=1), range(20))
    assert accumulated == [size for size in plain for _ in range(3)]
    assert len(set(plain)) >= 3


def _collate_with_target(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = _collate(samples)
    batch["y"] = batch.pop("target")
    return batch


def _image_loader() -> DataLoader[Any]:
    """5 batches of 2 images per epoch: windows of 2 are [0, 1], [2, 3], [4]."""
    gen = torch.Generator().manual_seed(0)
    samples = [
        {"images": torch.rand(3, 16, 16, generator=gen), "input_hw": (16, 16),
         "boxes2d": torch.zeros(0, 4)}
        for _ in range(10)
    ]  # fmt: skip
    return DataLoader(samples, batch_size=2, collate_fn=_collate_with_target)  # type: ignore[arg-type]


def _expected_sizes(seed: int, interval: int, epochs: int, start: int = 0) -> list[tuple[int, int]]:
    """The size of every batch, by hand: a draw at the first batch of step s when
    ``s % interval == 0`` (s counted from 1), one step per window of 2 batches."""
    rng, size, step, sizes = random.Random(seed), SIZES[-1], 0, []
    for _ in range(epochs):
        for window in ([0, 1], [2, 3], [4]):
            if (step + 1) % interval == 0:
                size = rng.choice(SIZES)
            sizes += [size] * len(window)
            step += 1
    return sizes[start:]


def _train_sizes(engine: str, out: str, callbacks: list[Any], **loop: Any) -> list[Any]:
    model = ShapeModel()
    connector = DataConnector({"images": "images"})
    run_toy(
        engine, out, callbacks, model=model, train_loader=_image_loader(),
        connectors=(connector, connector), check_val_every_n_epoch=None,
        accumulate_grad_batches=2, **loop,
    )  # fmt: skip
    return model.seen


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_size_changes_only_between_optimizer_steps_on_both_engines(tmp_path, engine) -> None:
    if engine == "lightning":
        pytest.importorskip("lightning")
    cb = YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=2, seed=5)
    seen = _train_sizes(engine, str(tmp_path), [cb], num_epochs=3)
    assert seen == _expected_sizes(seed=5, interval=2, epochs=3)
    assert len(set(seen)) >= 2


class _CrashError(Exception):
    """Ends a run the way a kill does."""


class SaveInsideWindow(Callback):
    """Saves the training state after batch ``batch_idx`` of ``epoch`` (not a step's end),
    then ends the run at the next batch."""

    def __init__(self, path: str, epoch: int, batch_idx: int) -> None:
        super().__init__()
        self.path, self.epoch, self.batch_idx, self.saved = path, epoch, batch_idx, False

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        if self.saved:
            raise _CrashError

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        if (trainer_state["current_epoch"], batch_idx) == (self.epoch, self.batch_idx):
            assert not trainer_state["step_end"]
            save_checkpoint(trainer_state["train_module"].checkpoint_state(), self.path)
            self.saved = True


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_resume_inside_a_window_keeps_the_window_size_and_the_draws(tmp_path, engine) -> None:
    """Stopped after batch 2 of epoch 1 (the first of a window, which drew the size of step
    5), the resumed run trains batch 3 at that size without drawing again."""
    if engine == "lightning":
        pytest.importorskip("lightning")
    ckpt = str(tmp_path / "inside.ckpt")
    with pytest.raises(_CrashError):
        _train_sizes(
            "native", str(tmp_path / "part"),
            [YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=1, seed=2),
             SaveInsideWindow(ckpt, epoch=1, batch_idx=2)],
            num_epochs=3,
        )  # fmt: skip
    resumed = _train_sizes(
        engine, str(tmp_path / engine),
        [YOLOXSyncRandomResizeCallback(size_list=SIZES, interval=1, seed=2)],
        num_epochs=3, ckpt_path=ckpt,
    )  # fmt: skip
    assert resumed == _expected_sizes(seed=2, interval=1, epochs=3, start=5 + 3)
