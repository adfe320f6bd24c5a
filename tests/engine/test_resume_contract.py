"""The resume contract (DESIGN section 5): straight runs equal resumed runs, bit for bit."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader

from trainer_fixtures import ToyDataset, ToyModel, toy_connectors, toy_loss_module
from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.callbacks.logging import LoggingCallback
from vistrain.engine.checkpoint_io import CheckpointError, save_checkpoint
from vistrain.engine.optim import LRSchedulerConfig, LRSchedulerWrapper
from vistrain.engine.trainer import Trainer
from vistrain.model.adapter import ModelExpEMAAdapter

NUM_EPOCHS = 3
CASES = [(0, False), (2, False), (2, True)]  # (num_workers, loader with its own generator)


class NoisyToyDataset(ToyDataset):
    """Random augmentation drawn from torch's RNG: in workers it depends on the worker seeds."""

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = super().__getitem__(idx)
        sample["x"] = sample["x"] + 0.1 * torch.randn(8)
        return sample


class ValScore(Callback):
    """A validation metric that depends on the weights: mean prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.total = torch.zeros(())

    def on_test_epoch_start(self, trainer_state, model) -> None:
        self.total = torch.zeros(())

    def on_test_batch_end(
        self, trainer_state, model, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.total = self.total + outputs["pred"].sum()

    def on_test_epoch_end(self, trainer_state, model) -> dict[str, Any]:
        return {"score": float(self.total)}


def _run(
    out: str,
    num_workers: int,
    generator: bool,
    num_epochs: int = NUM_EPOCHS,
    num_steps: int = -1,
    ckpt_path: str | None = None,
    step_period: int | None = None,
    extra_callbacks: list[Callback] | None = None,
    **step_options: Any,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Trainer]:
    torch.manual_seed(1234)
    model = ModelExpEMAAdapter(ToyModel(dropout=0.3), decay=0.9, warmup_steps=3)
    opt = torch.optim.SGD(model.model.parameters(), lr=0.05, momentum=0.9)
    sched = LRSchedulerWrapper(opt, [LRSchedulerConfig(StepLR, {"step_size": 1, "gamma": 0.7})])
    train = DataLoader(
        NoisyToyDataset(20, seed=3),
        batch_size=4,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(7) if generator else None,
    )
    test = DataLoader(ToyDataset(8, seed=4), batch_size=4, shuffle=False)
    ckpt_cb = (
        CheckpointCallback(save_prefix=out, checkpoint_period=1, async_save=False)
        if step_period is None
        else CheckpointCallback(
            save_prefix=out, checkpoint_period=step_period, epoch_based=False, async_save=False
        )
    )
    callbacks = [EMACallback(), LoggingCallback(refresh_rate=3), ValScore(), ckpt_cb]
    callbacks += extra_callbacks or []
    train_conn, test_conn = toy_connectors()
    trainer = Trainer(
        "cpu",
        out,
        train,
        test,
        train_conn,
        test_conn,
        callbacks,
        num_epochs=num_epochs,
        num_steps=num_steps,
        log_every_n_steps=2,
        **step_options,
    )
    trainer.fit(model, [opt], [sched], toy_loss_module(), ckpt_path=ckpt_path)
    return model, opt, trainer


def _flat(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _logs(out: str) -> list[tuple[str, int, float]]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    # perf/* are clocks and memory: never the same in two runs.
    return sorted(
        (r["tag"], r["step"], r["value"]) for r in records if not r["tag"].startswith("perf/")
    )


def _assert_identical(a: tuple[Any, Any], b: tuple[Any, Any]) -> None:
    state_a, state_b = _flat(a[0]), _flat(b[0])
    assert state_a.keys() == state_b.keys()
    assert any(k.startswith("ema_model") for k in state_a)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    opt_a, opt_b = a[1].state_dict(), b[1].state_dict()
    for idx, st in opt_a["state"].items():
        assert torch.equal(st["momentum_buffer"], opt_b["state"][idx]["momentum_buffer"])
    assert opt_a["param_groups"][0]["lr"] == opt_b["param_groups"][0]["lr"]
    step_a, step_b = a[2].loop.stepper, b[2].loop.stepper
    assert step_a.state_dict() == step_b.state_dict()


@pytest.mark.parametrize(("num_workers", "generator"), CASES)
def test_epoch_checkpoint_resume_is_bit_identical(
    tmp_path, num_workers: int, generator: bool
) -> None:
    straight = _run(str(tmp_path / "straight"), num_workers, generator)
    part = str(tmp_path / "part")
    _run(part, num_workers, generator, num_epochs=1)
    ckpt = os.path.join(part, "checkpoints", "last.ckpt")
    resumed = _run(part, num_workers, generator, ckpt_path=ckpt)
    _assert_identical(straight, resumed)
    assert _logs(str(tmp_path / "straight")) == _logs(part)


@pytest.mark.parametrize(("num_workers", "generator"), CASES)
def test_mid_epoch_step_checkpoint_resume_is_bit_identical(
    tmp_path, num_workers: int, generator: bool
) -> None:
    straight = _run(str(tmp_path / "straight"), num_workers, generator, step_period=7)
    part = str(tmp_path / "part")
    # 5 batches per epoch: step 7 is the middle of the second epoch
    _run(part, num_workers, generator, num_steps=7, step_period=7)
    ckpt = os.path.join(part, "checkpoints", "epoch=1-step=7.ckpt")
    assert torch.load(ckpt, weights_only=False)["batches_done"] == 2
    resumed = _run(part, num_workers, generator, ckpt_path=ckpt, step_period=7)
    _assert_identical(straight, resumed)
    assert _logs(str(tmp_path / "straight")) == _logs(part)


def test_resume_from_unfitting_checkpoint_changes_nothing(tmp_path) -> None:
    out = str(tmp_path / "run")
    _run(out, 0, False, num_epochs=1)
    torch.manual_seed(0)
    other = torch.nn.Linear(3, 3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    train_conn, test_conn = toy_connectors()
    trainer = Trainer(
        "cpu", out, DataLoader(ToyDataset(8), batch_size=4), None, train_conn, test_conn, []
    )
    with pytest.raises(CheckpointError, match=r"last\.ckpt"):
        trainer.fit(
            other,
            [opt],
            None,
            toy_loss_module(),
            ckpt_path=os.path.join(out, "checkpoints", "last.ckpt"),
        )
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(FileNotFoundError):
        trainer.fit(other, [opt], None, toy_loss_module(), ckpt_path=str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_mid_epoch_resume_is_bit_identical(tmp_path, precision: str) -> None:
    straight = _run(str(tmp_path / "straight"), 0, False, step_period=7, precision=precision)
    part = str(tmp_path / "part")
    _run(part, 0, False, num_steps=7, step_period=7, precision=precision)
    ckpt = os.path.join(part, "checkpoints", "epoch=1-step=7.ckpt")
    saved = torch.load(ckpt, weights_only=False)["step"]
    if precision == "16-mixed":
        assert saved["scaler"]["scale"] < 2.0**16 and saved["skipped_steps"] >= 1
    resumed = _run(part, 0, False, ckpt_path=ckpt, step_period=7, precision=precision)
    _assert_identical(straight, resumed)
    assert _logs(str(tmp_path / "straight")) == _logs(part)


class _StopError(Exception):
    """Ends a run the way a crash or a kill does: no epoch end, no fit end."""


class StopInsideWindow(Callback):
    """Saves the training state after batch ``batch_idx`` of ``epoch``, then ends the run.

    The save is in ``on_train_batch_end`` (where step checkpoints are taken); the run ends at
    the next batch's start, after that batch's logs were written.
    """

    def __init__(self, path: str, epoch: int, batch_idx: int) -> None:
        super().__init__()
        self.path, self.epoch, self.batch_idx = path, epoch, batch_idx
        self.saved = False

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        if self.saved:
            raise _StopError

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        if (trainer_state["current_epoch"], batch_idx) == (self.epoch, self.batch_idx):
            assert not trainer_state["step_end"]  # inside a window
            save_checkpoint(trainer_state["train_module"].checkpoint_state(), self.path)
            self.saved = True


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_stop_inside_an_accumulation_window_resumes_bit_identical(tmp_path, precision) -> None:
    options = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5, "precision": precision}
    straight = _run(str(tmp_path / "straight"), 0, False, **options)
    part = str(tmp_path / "part")
    ckpt = os.path.join(part, "inside-window.ckpt")
    # 5 batches per epoch: windows [0, 1], [2, 3], [4]; batch 2 of epoch 1 opens a window.
    with pytest.raises(_StopError):
        _run(part, 0, False, extra_callbacks=[StopInsideWindow(ckpt, 1, 2)], **options)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"]["accumulated_batches"] == 1 and saved["global_step"] == 4
    assert any(g is not None for g in saved["step"]["accumulated_grads"][0])
    resumed = _run(part, 0, False, ckpt_path=ckpt, **options)
    _assert_identical(straight, resumed)
    assert _logs(str(tmp_path / "straight")) == _logs(part)
