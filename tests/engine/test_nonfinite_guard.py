"""The non-finite guard: a NaN/Inf loss or weight stops the run, named, in both engines."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from dist_utils import run_distributed
from trainer_fixtures import (
    ENGINES,
    RecordingCallback,
    ToyModel,
    mse,
    run_toy,
    toy_connectors,
    toy_loader,
)
from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.checkpoint_io import load_checkpoint
from vistrain.engine.connectors import LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule
from vistrain.engine.nonfinite_guard import NonFiniteError, NonFiniteGuard, nonfinite_tensors
from vistrain.engine.trainer import Trainer
from vistrain.zoo.base import apply_overrides
from vistrain.zoo.toy_classifier import Params as ToyParams


@pytest.fixture(params=["read at once", "kept for the fold"])
def both_paths(request, monkeypatch):
    """Runs a test both ways the guard finds a bad value: CPU values read as they arrive,
    and the way of accelerator values (kept, stacked and folded on the device)."""
    monkeypatch.setattr(NonFiniteGuard, "READ_CPU_VALUES_AT_ONCE", request.param == "read at once")
    return request.param


class PoisonLoss(Callback):
    """Makes the model output ``value`` (NaN) from training step ``at_step`` on (forward hook)."""

    def __init__(self, at_step: int, value: float = float("nan")) -> None:
        super().__init__()
        self.at_step = at_step
        self.value = value
        self.handle: Any = None
        self.last_step = 0  # the latest global_step a batch ended

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        if trainer_state["global_step"] + 1 == self.at_step and self.handle is None:
            self.handle = model.register_forward_hook(
                lambda mod, args, out: {"pred": out["pred"] * self.value}
            )

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        self.last_step = trainer_state["global_step"]


class PoisonWeights(Callback):
    """Puts an Inf into the weights at the end of epoch ``epoch`` (losses stay finite)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_train_epoch_end(self, trainer_state, model, loss_module) -> None:
        if trainer_state["current_epoch"] == self.epoch:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")


def _last_step(folder: str) -> int:
    return int(load_checkpoint(os.path.join(folder, "checkpoints", "last.ckpt"))["global_step"])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.usefixtures("both_paths")
def test_nan_loss_stops_at_next_log_step_naming_step_epoch_and_terms(tmp_path, engine):
    # 6 steps per epoch; NaN from step 7 (epoch 1); log steps every 4 -> read at step 8.
    ckpt = CheckpointCallback(save_prefix=str(tmp_path), async_save=False)
    with pytest.raises(NonFiniteError) as err:
        run_toy(engine, str(tmp_path), [PoisonLoss(at_step=7), ckpt], num_epochs=3)
    message = str(err.value)
    assert "total_loss" in message and "mse" in message
    assert "at step 7 (epoch 1)" in message
    assert _last_step(str(tmp_path)) == 6  # the epoch-0 checkpoint stays last
    assert not any("step=12" in name for name in os.listdir(tmp_path / "checkpoints"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.usefixtures("both_paths")
def test_nan_between_log_steps_is_caught_before_the_checkpoint(tmp_path, engine):
    ckpt = CheckpointCallback(save_prefix=str(tmp_path))
    with pytest.raises(NonFiniteError, match="at step 9 \\(epoch 1\\)"):
        run_toy(
            engine, str(tmp_path), [PoisonLoss(at_step=9), ckpt], num_epochs=3,
            log_every_n_steps=100,
        )  # fmt: skip
    assert _last_step(str(tmp_path)) == 6
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch=0-step=6.ckpt", "last.ckpt"]


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_weights_never_become_last_or_best(tmp_path, engine):
    ckpt = CheckpointCallback(save_prefix=str(tmp_path), monitor="score", mode="max")
    with pytest.raises(NonFiniteError, match="weights hold NaN or Inf"):
        run_toy(
            engine, str(tmp_path), [RecordingCallback(), PoisonWeights(epoch=1), ckpt],
            num_epochs=3,
        )  # fmt: skip
    folder = tmp_path / "checkpoints"
    assert _last_step(str(tmp_path)) == 6
    assert "epoch=1-step=12.ckpt" not in os.listdir(folder)
    for name in ("last.ckpt", "best.ckpt"):
        weights = load_checkpoint(str(folder / name))["state_dict"]
        assert nonfinite_tensors(weights) == []


def test_observe_and_fold_read_nothing_from_the_device(monkeypatch):
    monkeypatch.setattr(NonFiniteGuard, "READ_CPU_VALUES_AT_ONCE", False)  # as on a GPU
    guard = NonFiniteGuard()
    guard.FOLD_EVERY = 2  # fold on the device several times before the check
    finite, inf = torch.tensor(1.0), torch.tensor(float("inf"))

    def no_sync(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("observe() read a tensor on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for step in range(1, 8):
        bad_b = inf if step >= 3 else finite
        loss = inf if step >= 5 else finite
        guard.observe(loss, {"a": finite, "b": bad_b}, step, epoch=step // 4)
    monkeypatch.undo()
    with pytest.raises(NonFiniteError) as err:
        guard.check()
    assert "non-finite value of b at step 3 (epoch 0) (later also: total_loss)" in str(err.value)


def test_cpu_values_are_read_as_they_arrive_and_not_kept():
    """On the CPU there is no device to wait for: nothing is kept for a later fold."""
    guard = NonFiniteGuard()
    guard.FOLD_EVERY = 10**9  # a kept value would stay kept
    finite, inf = torch.tensor(1.0), torch.tensor(float("inf"))
    for step in range(1, 8):
        one = inf if step >= 5 else finite  # a one-term module: term, "loss" and total alike
        guard.observe(one, {"a": finite, "b": inf if step >= 3 else finite, "loss": one}, step, 0)
        guard.observe_grad_norm(torch.tensor(float("nan")) if step == 6 else finite, step)
        assert guard._losses.values == [] and guard._grad_norm.values == []
    with pytest.raises(NonFiniteError) as err:
        guard.check()
    message = "non-finite value of b at step 3 (epoch 0) (later also: grad_norm, loss, total_loss)"
    assert message in str(err.value)


@pytest.mark.usefixtures("both_paths")
def test_finite_steps_pass_and_grad_norm_is_named():
    guard = NonFiniteGuard()
    guard.observe(torch.tensor(1.0), {"a": torch.tensor(0.5)}, 1, epoch=0)
    guard.check()
    guard.observe_grad_norm(torch.tensor(float("nan")), 2)
    with pytest.raises(NonFiniteError, match="grad_norm at step 2"):
        guard.check()


@pytest.mark.usefixtures("both_paths")
def test_a_window_is_observed_at_its_step_and_a_new_epoch_inside_it_is_kept():
    guard = NonFiniteGuard()
    guard.FOLD_EVERY = 3  # a fold in the middle of a window
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    for step in (1, 2):
        guard.observe_window([(finite, {"a": finite}, 0)] * 2, step)
    guard.check()
    guard.observe_window([(finite, {"a": finite}, 0), (finite, {"a": nan}, 1)], 3)
    with pytest.raises(NonFiniteError, match=r"value of a at step 3 \(epoch 1\)"):
        guard.check()


class _OwnForwardLoss(LossModule):
    """A loss module with its own forward whose ``"loss"`` metric is not its total."""

    def forward(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, metrics = super().forward(outputs, batch)
        return total * float("nan"), metrics


def test_a_loss_module_with_its_own_forward_has_its_real_total_watched(tmp_path):
    train_conn, test_conn = toy_connectors()
    trainer = Trainer(
        "cpu",
        str(tmp_path),
        toy_loader(8, 4),
        None,
        train_conn,
        test_conn,
        [],
        num_epochs=1,
        log_every_n_steps=1,
        tensorboard=False,
    )
    loss = _OwnForwardLoss(
        {
            "loss": mse,
            "connector": LossConnector({"pred": pred_key("pred"), "target": data_key("y")}),
        }
    )
    model = ToyModel()
    # the loss terms were finite: only the total and the gradients are named
    with pytest.raises(NonFiniteError, match="value of total_loss, grad_norm at step 1 "):
        trainer.fit(model, [torch.optim.SGD(model.parameters(), lr=0.1)], None, loss)


@pytest.mark.parametrize("engine", ENGINES)
def test_fp16_run_whose_loss_is_inf_stops_after_max_skipped_steps(tmp_path, engine):
    # From step 3 on every loss is inf: fp16 loss scaling skips each step (the guard does
    # not watch skipped steps' losses) and halves the scale. Without the rule the run would
    # skip all of its 180 steps; it stops at the 101st skip in a row.
    poison = PoisonLoss(at_step=3, value=float("inf"))
    with pytest.raises(NonFiniteError) as err:
        run_toy(engine, str(tmp_path), [poison], num_epochs=30, precision="16-mixed")
    message = str(err.value)
    assert "skipped 101 steps in a row (steps 3-103, epoch 17; max_skipped_steps=100)" in message
    assert "precision='bf16-mixed'" in message and "\n" not in message
    assert poison.last_step == 102  # step 103 raised inside the step, before its batch end


def test_skipped_steps_count_only_in_a_row():
    guard = NonFiniteGuard(max_skipped_steps=3)
    for step in (1, 2, 3, 5, 6, 7):  # step 4 stepped: the run of skips starts over
        guard.observe_skipped_step(step, epoch=0, scale=1.0)
    with pytest.raises(NonFiniteError, match="skipped 4 steps in a row \\(steps 5-8, epoch 1;"):
        guard.observe_skipped_step(8, epoch=1, scale=0.5)
    with pytest.raises(ValueError, match="max_skipped_steps=0"):
        NonFiniteGuard(max_skipped_steps=0)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_set_refuses_non_finite_floats(value):
    with pytest.raises(ValueError, match="not a finite number") as err:
        apply_overrides(ToyParams(), [f"lr={value}"])
    assert "\n" not in str(err.value) and "lr=" in str(err.value)


def _two_rank_nan(rank: int, world_size: int, folder: str) -> str:
    """Rank 1 alone gets a NaN loss at step 3; returns each rank's error message."""
    callbacks: list[Callback] = [PoisonLoss(at_step=3)] if rank == 1 else []
    try:
        run_toy("native", folder, callbacks, num_epochs=2)
    except NonFiniteError as err:
        return str(err)
    return "no error"


def test_ranks_stop_together_and_agree_on_the_first_bad_step(tmp_path):
    messages = run_distributed(_two_rank_nan, 2, str(tmp_path))
    # Rank 0's own loss turns NaN only at step 4 (through the averaged gradients); the
    # merged check names rank 1's step 3 on both ranks, and neither waits for the other.
    assert all("at step 3 (epoch 0)" in message for message in messages), messages


@pytest.mark.usefixtures("both_paths")
def test_names_that_change_inside_a_window_check_the_rows_before_the_change():
    """The window's rows are counted together; a name change must still see earlier rows."""
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    guard = NonFiniteGuard()
    guard.observe_window([(finite, {"a": finite}, 0), (finite, {"a": finite, "b": nan}, 0)], 1)
    with pytest.raises(NonFiniteError, match="value of b at step 1"):
        guard.check()
    guard = NonFiniteGuard()
    with pytest.raises(NonFiniteError, match="value of a at step 2"):
        guard.observe_window([(finite, {"a": nan}, 0), (finite, {"a": finite, "b": finite}, 0)], 2)
