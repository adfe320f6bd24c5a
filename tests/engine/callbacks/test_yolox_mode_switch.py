from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler, Subset

from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.yolox_callbacks import YOLOXModeSwitchCallback
from vistrain.engine.checkpoint_io import save_checkpoint
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule
from vistrain.engine.trainer import Trainer

LOGGER = "vistrain.engine.callbacks.yolox_callbacks"


class FakePipe(Dataset[dict[str, Any]]):
    """Stands in for MultiSampleDataPipe: samples say whether the strong stage ran."""

    def __init__(self, num: int = 12, strong: bool = True) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(num, 4, generator=gen)
        self.strong = strong

    @property
    def has_multi_sample(self) -> bool:
        return self.strong

    def without_multi_sample(self) -> FakePipe:
        out = FakePipe.__new__(FakePipe)
        out.x, out.strong = self.x, False
        return out

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"x": self.x[idx], "y": self.x[idx, :2], "strong": self.strong}


class PlainDataset(Dataset[dict[str, Any]]):
    """A data set with no multi-sample stage at all."""

    def __init__(self, num: int = 12) -> None:
        self.x = torch.zeros(num, 4)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"x": self.x[idx], "y": self.x[idx, :2], "strong": False}


class FakeHeadLoss(nn.Module):
    """Stands in for YOLOXHeadLoss: an L1 term appears once enable_l1_loss() ran."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_l1: nn.Module | None = None
        self.enable_calls = 0

    def enable_l1_loss(self) -> None:
        self.enable_calls += 1
        self.loss_l1 = nn.L1Loss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"loss_main": ((pred - target) ** 2).mean()}
        if self.loss_l1 is not None:
            out["loss_l1"] = self.loss_l1(pred, target)
        return out


class FakeEngine:
    """Records the TrainingEngine calls."""

    def __init__(self) -> None:
        self.loaders: list[DataLoader[Any]] = []
        self.val_every: list[int] = []

    def set_train_dataloader(self, dataloader: DataLoader[Any]) -> None:
        self.loaders.append(dataloader)

    def set_check_val_every_n_epoch(self, every_n_epochs: int) -> None:
        self.val_every.append(every_n_epochs)

    def checkpoint_state(self) -> dict[str, Any]:
        return {}


def _worker_init(worker_id: int) -> None:
    del worker_id


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "x": torch.stack([s["x"] for s in samples]),
        "y": torch.stack([s["y"] for s in samples]),
        "strong": [s["strong"] for s in samples],
    }


def loss_module(head: nn.Module | None = None) -> LossModule:
    conn = LossConnector({"pred": pred_key("pred"), "target": data_key("y")})
    if head is None:
        return LossModule(
            [{"loss": lambda pred, target: (pred - target).abs().mean(), "connector": conn}]
        )
    return LossModule([{"loss": head, "connector": conn, "name": "head"}])


def state(epoch: int, loader: DataLoader[Any] | None, engine: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "current_epoch": epoch,
        "num_epochs": 10,
        "global_step": 0,
        "num_steps": -1,
        "train_dataloader": loader,
        "num_train_batches": None,
        "test_dataloader": None,
        "num_test_batches": None,
        "train_engine": "native",
    }
    if engine is not None:
        out["train_module"] = engine
    return out


def make_loader(dataset: Dataset[Any]) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(3)
    return DataLoader(
        dataset,
        batch_size=4,
        sampler=RandomSampler(dataset, generator=generator),
        num_workers=2,
        collate_fn=_collate,
        pin_memory=False,
        drop_last=True,
        timeout=7.0,
        worker_init_fn=_worker_init,
        generator=generator,
        prefetch_factor=3,
        persistent_workers=True,
    )


# ------------------------------------------------------------------------- unit, with fakes


def test_before_switch_nothing_changes_then_switch_changes_all_three() -> None:
    cb = YOLOXModeSwitchCallback(switch_epoch=3)
    engine, head, loader = FakeEngine(), FakeHeadLoss(), make_loader(FakePipe())
    losses = loss_module(head)
    for epoch in range(2):  # epochs 0, 1: strong mode
        cb.on_train_epoch_start(state(epoch, loader, engine), nn.Identity(), losses)
        cb.on_train_epoch_end(state(epoch, loader, engine), nn.Identity(), losses)
    assert engine.loaders == [] and engine.val_every == [] and head.loss_l1 is None
    cb.on_train_epoch_start(state(2, loader, engine), nn.Identity(), losses)
    assert engine.loaders == []
    cb.on_train_epoch_end(state(2, loader, engine), nn.Identity(), losses)  # end of epoch 2

    # Data: one new loader, without the multi-sample stage, every setting kept.
    assert len(engine.loaders) == 1
    new = engine.loaders[0]
    assert new is not loader
    assert new.dataset.has_multi_sample is False and new.dataset[0]["strong"] is False
    assert loader.dataset.has_multi_sample is True  # the old pipe is not mutated
    assert new.sampler is loader.sampler and new.generator is loader.generator
    assert new.worker_init_fn is _worker_init and new.collate_fn is _collate
    assert (new.batch_size, new.drop_last, new.num_workers) == (4, True, 2)
    assert (new.timeout, new.prefetch_factor, new.persistent_workers) == (7.0, 3, True)
    # Loss: the L1 term is on and shows up in the metrics.
    assert head.loss_l1 is not None
    _, metrics = losses({"pred": torch.zeros(2, 2)}, {"y": torch.ones(2, 2)})
    assert "head.loss_l1" in metrics
    # Validation: every epoch.
    assert engine.val_every == [1]


def test_switch_is_idempotent() -> None:
    cb = YOLOXModeSwitchCallback(switch_epoch=1)
    engine, head, loader = FakeEngine(), FakeHeadLoss(), make_loader(FakePipe())
    losses = loss_module(head)
    cb.on_train_epoch_end(state(0, loader, engine), nn.Identity(), losses)
    for epoch in (1, 2):
        cb.on_train_epoch_start(state(epoch, engine.loaders[0], engine), nn.Identity(), losses)
        cb.on_train_epoch_end(state(epoch, engine.loaders[0], engine), nn.Identity(), losses)
    cb.switch(state(3, loader, engine), losses)
    assert len(engine.loaders) == 1 and engine.val_every == [1] and head.enable_calls == 1


@pytest.mark.parametrize("resume_epoch", [4, 7])
def test_resumed_run_switches_before_its_first_step(resume_epoch: int) -> None:
    # A fresh callback (as after a resume) at an epoch past switch_epoch switches in
    # on_train_epoch_start, i.e. before any batch of that epoch.
    cb = YOLOXModeSwitchCallback(switch_epoch=4)
    engine, head, loader = FakeEngine(), FakeHeadLoss(), make_loader(FakePipe())
    cb.on_train_epoch_start(state(resume_epoch, loader, engine), nn.Identity(), loss_module(head))
    assert len(engine.loaders) == 1 and not engine.loaders[0].dataset.has_multi_sample
    assert head.loss_l1 is not None and engine.val_every == [1]


def test_epoch_start_before_switch_epoch_does_not_switch() -> None:
    cb = YOLOXModeSwitchCallback(switch_epoch=4)
    engine, head = FakeEngine(), FakeHeadLoss()
    cb.on_train_epoch_start(
        state(3, make_loader(FakePipe()), engine), nn.Identity(), loss_module(head)
    )
    assert engine.loaders == [] and head.loss_l1 is None and not cb.switched


def test_wrapped_datasets_are_stripped_inside() -> None:
    cb = YOLOXModeSwitchCallback(switch_epoch=1)
    engine = FakeEngine()
    inner = FakePipe(12)
    subset = Subset(inner, [5, 1, 7, 2, 9, 0, 3, 4])
    cb.on_train_epoch_end(
        state(0, make_loader(subset), engine), nn.Identity(), loss_module(FakeHeadLoss())
    )
    new = engine.loaders[0].dataset
    assert isinstance(new, Subset) and new.indices == subset.indices
    assert new.dataset.has_multi_sample is False
    assert [new[i]["strong"] for i in range(len(new))] == [False] * 8

    cb = YOLOXModeSwitchCallback(switch_epoch=1)
    engine = FakeEngine()
    concat = ConcatDataset([FakePipe(4), PlainDataset(4)])
    cb.on_train_epoch_end(
        state(0, make_loader(concat), engine), nn.Identity(), loss_module(FakeHeadLoss())
    )
    new_concat = engine.loaders[0].dataset
    assert isinstance(new_concat, ConcatDataset)
    assert new_concat.datasets[0].has_multi_sample is False
    assert new_concat.datasets[1] is concat.datasets[1]


def test_dataset_without_multi_sample_stage_warns_and_keeps_loader(caplog) -> None:
    cb = YOLOXModeSwitchCallback(switch_epoch=1)
    engine, head = FakeEngine(), FakeHeadLoss()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cb.on_train_epoch_end(
            state(0, make_loader(PlainDataset()), engine), nn.Identity(), loss_module(head)
        )
    assert "no multi-sample stage" in caplog.text and "PlainDataset" in caplog.text
    assert engine.loaders == []
    # The other two parts of the switch still happen.
    assert head.loss_l1 is not None and engine.val_every == [1]


def test_missing_yolox_loss_warns(caplog) -> None:
    cb = YOLOXModeSwitchCallback(switch_epoch=1)
    engine = FakeEngine()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cb.on_train_epoch_end(
            state(0, make_loader(FakePipe()), engine), nn.Identity(), loss_module()
        )
    assert "no YOLOXHeadLoss" in caplog.text
    assert len(engine.loaders) == 1 and engine.val_every == [1]


def test_bad_arguments_and_missing_engine() -> None:
    for bad in (-1, -2):
        with pytest.raises(ValueError, match="switch_epoch"):
            YOLOXModeSwitchCallback(switch_epoch=bad)
    with pytest.raises(TypeError, match="switch_epoch"):
        YOLOXModeSwitchCallback(switch_epoch=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        YOLOXModeSwitchCallback()  # type: ignore[call-arg]
    cb = YOLOXModeSwitchCallback(switch_epoch=1)
    with pytest.raises(ValueError, match="train_module"):
        cb.on_train_epoch_end(state(0, make_loader(FakePipe()), None), nn.Identity(), loss_module())


# ------------------------------------------------------------------ with the native Trainer


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": self.lin(x)}


class Recorder(Callback):
    """Per epoch: strong flags of the trained samples, metric names; and validated epochs."""

    def __init__(self, save_at_epoch_end: int | None = None, path: str = "") -> None:
        super().__init__()
        self.strong: dict[int, set[bool]] = {}
        self.metric_names: dict[int, set[str]] = {}
        self.validated: list[int] = []
        self.save_at_epoch_end, self.path = save_at_epoch_end, path

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        epoch = trainer_state["current_epoch"]
        self.strong.setdefault(epoch, set()).update(batch["strong"])
        self.metric_names.setdefault(epoch, set()).update(trainer_state["metrics"])
        return None

    def on_train_epoch_end(self, trainer_state, model, loss_module) -> None:
        if trainer_state["current_epoch"] == self.save_at_epoch_end:
            save_checkpoint(trainer_state["train_module"].checkpoint_state(), self.path)

    def on_test_epoch_start(self, trainer_state, model) -> None:
        self.validated.append(trainer_state["current_epoch"])


def run_trainer(
    tmp_path, recorder: Recorder, num_epochs: int, ckpt: str | None = None, switch_epoch: int = 2
):
    head = FakeHeadLoss()
    loader = DataLoader(FakePipe(8), batch_size=4, shuffle=True, collate_fn=_collate)
    test_loader = DataLoader(FakePipe(4), batch_size=4, collate_fn=_collate)
    conn = DataConnector({"x": "x"})
    trainer = Trainer(
        device="cpu",
        output_dir=str(tmp_path),
        train_dataloader=loader,
        test_dataloader=test_loader,
        train_data_connector=conn,
        test_data_connector=conn,
        callbacks=[YOLOXModeSwitchCallback(switch_epoch=switch_epoch), recorder],
        num_epochs=num_epochs,
        check_val_every_n_epoch=10,
        tensorboard=False,
    )
    model = TinyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer.fit(model, [opt], None, loss_module(head), ckpt_path=ckpt)
    return trainer, head


def test_native_trainer_switches_data_loss_and_validation(tmp_path) -> None:
    rec = Recorder()
    trainer, head = run_trainer(tmp_path, rec, num_epochs=4)
    assert rec.strong == {0: {True}, 1: {True}, 2: {False}, 3: {False}}
    assert "head.loss_l1" not in rec.metric_names[1]
    assert "head.loss_l1" in rec.metric_names[2] and "head.loss_l1" in rec.metric_names[3]
    assert rec.validated == [1, 2, 3]  # every epoch from the switch on (was every 10th)
    assert head.enable_calls == 1 and trainer.check_val_every_n_epoch == 1


def test_native_trainer_resume_after_switch_trains_switched_from_first_step(tmp_path) -> None:
    ckpt = str(tmp_path / "epoch2.ckpt")
    run_trainer(tmp_path / "a", Recorder(save_at_epoch_end=2, path=ckpt), num_epochs=3)
    rec = Recorder()
    _, head = run_trainer(tmp_path / "b", rec, num_epochs=5, ckpt=ckpt)
    assert rec.strong == {3: {False}, 4: {False}}
    assert "head.loss_l1" in rec.metric_names[3]
    assert rec.validated == [3, 4] and head.enable_calls == 1


@pytest.mark.parametrize("switch_epoch", [2, 5])
def test_switch_epoch_at_or_past_the_end_never_switches_and_warns(
    tmp_path, caplog, switch_epoch
) -> None:
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer, head = run_trainer(tmp_path, rec, num_epochs=2, switch_epoch=switch_epoch)
    assert rec.strong == {0: {True}, 1: {True}}  # the loader was never swapped
    assert head.enable_calls == 0 and trainer.check_val_every_n_epoch == 10
    warnings = [r.getMessage() for r in caplog.records if "never switches" in r.getMessage()]
    assert len(warnings) == 1 and f"switch_epoch={switch_epoch}" in warnings[0]
    assert "num_epochs=2" in warnings[0]


def test_a_run_that_never_switched_switches_when_resumed_longer(tmp_path) -> None:
    ckpt = str(tmp_path / "epoch1.ckpt")
    first = Recorder(save_at_epoch_end=1, path=ckpt)
    run_trainer(tmp_path / "a", first, num_epochs=2, switch_epoch=2)
    assert first.strong == {0: {True}, 1: {True}}
    rec = Recorder()
    _, head = run_trainer(tmp_path / "b", rec, num_epochs=4, ckpt=ckpt, switch_epoch=2)
    assert rec.strong == {2: {False}, 3: {False}} and head.enable_calls == 1


def test_switch_epoch_zero_runs_every_epoch_in_the_final_mode(tmp_path) -> None:
    rec = Recorder()
    _, head = run_trainer(tmp_path, rec, num_epochs=2, switch_epoch=0)
    assert rec.strong == {0: {False}, 1: {False}}
    assert "head.loss_l1" in rec.metric_names[0] and head.enable_calls == 1
    assert rec.validated == [0, 1]


# ------------------------------------------------- with the real data pipe, loader and loss


class ImageData(Dataset[dict[str, Any]]):
    """Eight 32x48 images with one box each, in the keys the YOLOX transforms use."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, idx: int) -> dict[str, Any]:
        image = torch.full((3, 32, 48), float(idx * 20))
        return {
            "images": image,
            "input_hw": (32, 48),
            "original_hw": (32, 48),
            "boxes2d": torch.tensor([[4.0, 4.0, 20.0, 24.0]]),
            "boxes2d_classes": torch.tensor([idx % 2]),
        }


def test_real_pipe_loader_and_head_loss_are_switched() -> None:
    from vistrain.data.loader import build_train_dataloader
    from vistrain.data.pipe import MultiSampleDataPipe
    from vistrain.data.presets import yolox_train_pipe
    from vistrain.op.detect.yolox import YOLOXHeadLoss

    pipe = yolox_train_pipe(ImageData(), image_size=(64, 64), mixup_prob=0.0)
    loader = build_train_dataloader(pipe, batch_size=4, seed=5, distributed=False)
    head = YOLOXHeadLoss(num_classes=2)
    losses = LossModule(
        [{"loss": head, "connector": LossConnector({"x": data_key("images")}), "name": "det"}]
    )
    engine = FakeEngine()
    YOLOXModeSwitchCallback(switch_epoch=1).on_train_epoch_end(
        state(0, loader, engine), nn.Identity(), losses
    )
    new = engine.loaders[0]
    assert isinstance(new.dataset, MultiSampleDataPipe) and not new.dataset.has_multi_sample
    assert pipe.has_multi_sample  # the old pipe is not changed
    assert new.dataset.transforms == pipe.transforms
    assert new.sampler is loader.sampler and new.generator is loader.generator
    assert new.worker_init_fn is loader.worker_init_fn and new.collate_fn is loader.collate_fn
    # Without mosaic every sample is a single image, resized and padded to 64x64: its one box
    # keeps its shape (scaled by ~4/3, maybe flipped, never zoomed or rotated by the affine).
    batch = next(iter(new))
    assert tuple(batch["images"].shape) == (4, 3, 64, 64)
    for boxes in batch["boxes2d"]:
        assert boxes.shape == (1, 4)
        torch.testing.assert_close(
            boxes[0, 2:] - boxes[0, :2], torch.tensor([64.0, 80.0]) / 3, atol=0.5, rtol=0
        )
    assert head.loss_l1 is not None and engine.val_every == [1]
