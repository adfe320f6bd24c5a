from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

import vistrain.common.timer as timer_module
import vistrain.engine.callbacks.logging as logging_module
import vistrain.engine.metric_window as metric_window
from dist_utils import run_distributed
from vistrain.common.progress import ProgressDisplay
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.logging import LoggingCallback, format_eta, total_train_steps
from vistrain.engine.callbacks.yolox_callbacks import YOLOXModeSwitchCallback
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule
from vistrain.engine.trainer import Trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timer_module, "time", fake)
    monkeypatch.setattr(logging_module, "time", fake)
    return fake


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """The messages logged to the vistrain logger during the test."""
    logger = logging.getLogger("vistrain")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    handler = ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def make_state(**overrides: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "current_epoch": 0,
        "num_epochs": 10,
        "global_step": 0,
        "num_steps": -1,
        "train_dataloader": None,
        "num_train_batches": 120,
        "test_dataloader": None,
        "num_test_batches": [20],
        "batches_done": 0,
    }
    state.update(overrides)
    return state


def make_callback(**kwargs: Any) -> LoggingCallback:
    callback = LoggingCallback(**kwargs)
    callback._display = ProgressDisplay()  # plain: nothing drawn, lines only
    return callback


def default_metrics(step: int) -> dict[str, Any]:
    return {"loss": torch.tensor(float(step)), "loss_cls": torch.tensor(0.25)}


def train(
    callback: LoggingCallback,
    state: dict[str, Any],
    clock: FakeClock,
    num_batches: int,
    data_s: float = 0.1,
    step_s: float = 0.4,
    metrics: Callable[[int], dict[str, Any]] = default_metrics,
    batch_size: int = 8,
) -> list[Any]:
    """Run ``num_batches`` training batches the way the Trainer calls the hooks."""
    logs = []
    for _ in range(num_batches):
        batch_idx = state["batches_done"]
        batch = {"images": torch.zeros(batch_size, 3, 2, 2)}
        clock.now += data_s
        callback.on_train_batch_start(state, None, None, batch, batch_idx)  # type: ignore[arg-type]
        clock.now += step_s
        state["global_step"] += 1
        state["batches_done"] = batch_idx + 1
        state["metrics"] = metrics(state["global_step"])
        out = callback.on_train_batch_end(state, None, None, {}, batch, batch_idx)  # type: ignore[arg-type]
        # perf/* (clocks, memory) are pinned in test_perf_scalars_match_the_line.
        logs.append(out and {k: v for k, v in out.items() if not k.startswith("perf/")})
    return logs


def validate(
    callback: LoggingCallback, state: dict[str, Any], clock: FakeClock, seconds: float
) -> None:
    callback.on_test_epoch_start(state, None)  # type: ignore[arg-type]
    for batch_idx in range(4):
        clock.now += seconds / 4
        callback.on_test_batch_end(state, None, {}, {}, batch_idx)  # type: ignore[arg-type]
    callback.on_test_epoch_end(state, None)  # type: ignore[arg-type]


def test_perf_scalars_match_the_line(clock: FakeClock, lines: list[str]) -> None:
    callback = make_callback(refresh_rate=4)
    state = make_state(current_epoch=0, global_step=0)
    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    logs = []
    for batch_idx in range(8):
        batch = {"images": torch.zeros(8, 3, 2, 2)}
        clock.now += 0.1
        callback.on_train_batch_start(state, None, None, batch, batch_idx)  # type: ignore[arg-type]
        clock.now += 0.4
        state["global_step"] += 1
        state["batches_done"] = batch_idx + 1
        state["metrics"] = default_metrics(state["global_step"])
        logs.append(callback.on_train_batch_end(state, None, None, {}, batch, batch_idx))  # type: ignore[arg-type]
    # The second window: 4 batches of 0.1 s waiting + 0.4 s training, 8 images each.
    perf = {k: v for k, v in logs[7].items() if k.startswith("perf/")}
    assert perf.pop("perf/max_memory_mb") > 0
    assert perf == pytest.approx(
        {"perf/step_time": 0.5, "perf/img_per_s": 16.0, "perf/data_time": 0.1}
    )
    assert ", 2.00 it/s, 16.0 img/s, data: 0.100s, " in lines[-1]  # what the line shows
    assert all(log is None for i, log in enumerate(logs) if i not in (3, 7))


def test_refresh_rate_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="refresh_rate=0"):
        LoggingCallback(refresh_rate=0)
    with pytest.raises(ValueError, match="refresh_rate=-5"):
        LoggingCallback(refresh_rate=-5)
    with pytest.raises(TypeError, match="refresh_rate"):
        LoggingCallback(refresh_rate=2.5)  # type: ignore[arg-type]
    assert LoggingCallback().refresh_rate == 50


def test_epoch_line_format_rates_data_time_and_first_batch(
    clock: FakeClock, lines: list[str]
) -> None:
    callback = make_callback(refresh_rate=40)
    state = make_state(current_epoch=2, global_step=240)
    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    logs = train(callback, state, clock, 40, metrics=lambda step: default_metrics(step - 241))
    # First batch logged at once: 0.4 s for 1 step, 959 steps left -> 383.6 s.
    assert lines[0] == "Epoch 2: 1/120, ETA: 0:06:24, loss: 0.0000, loss_cls: 0.2500 (first batch)"
    # 40 batches: 19.9 s of training (timer starts at the first batch), 920 steps left.
    assert lines[1] == (
        "Epoch 2: 40/120, ETA: 0:07:38, 2.01 it/s, 16.1 img/s, data: 0.100s, "
        "loss: 19.5000, loss_cls: 0.2500"
    )
    assert len(lines) == 2
    assert logs[:39] == [None] * 39  # the first-batch line returns nothing
    assert logs[39] == pytest.approx({"loss": 19.5, "loss_cls": 0.25})


def test_validation_time_is_not_training_time(clock: FakeClock, lines: list[str]) -> None:
    callback = make_callback(refresh_rate=40)
    state = make_state(current_epoch=2, global_step=240)
    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    train(callback, state, clock, 40)
    validate(callback, state, clock, seconds=100.0)
    validate(callback, state, clock, seconds=50.0)  # twice in a row must not trip the timers
    train(callback, state, clock, 40)
    # 39.8 s of training for 80 steps, 880 left -> 437.8 s; 150 s of validation excluded.
    assert lines[-1].startswith(
        "Epoch 2: 80/120, ETA: 0:07:18, 2.01 it/s, 16.1 img/s, data: 0.100s"
    )


def test_eta_after_mid_epoch_resume_uses_steps_of_this_process(
    clock: FakeClock, lines: list[str]
) -> None:
    callback = make_callback(refresh_rate=10)
    state = make_state(current_epoch=5, global_step=660, batches_done=60)
    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    train(callback, state, clock, 10, data_s=0.0, step_s=1.0)
    # 1 step/s measured over the 10 steps done here; 1200 - 670 = 530 steps left.
    assert lines[-1].startswith("Epoch 5: 70/120, ETA: 0:08:50, 1.00 it/s")


def test_eta_unknown_without_limit_and_never_negative(clock: FakeClock, lines: list[str]) -> None:
    callback = make_callback(refresh_rate=10, epoch_based=False)
    state = make_state(num_epochs=-1, num_steps=-1, num_train_batches=None)
    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    train(callback, state, clock, 10)
    assert lines[-1].startswith("Iter 10/?, ETA: ?, 2.04 it/s")  # 10 steps in 4.9 s
    assert format_eta(None) == "?"
    assert format_eta(float("inf")) == "?"
    assert format_eta(-12.0) == "0:00:00"
    assert format_eta(3725.4) == "1:02:05"


def test_step_based_lines_align_to_global_step(clock: FakeClock, lines: list[str]) -> None:
    callback = make_callback(refresh_rate=20, epoch_based=False)
    state = make_state(num_steps=1000, num_epochs=-1, global_step=30, batches_done=30)
    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    logs = train(callback, state, clock, 30, data_s=0.0, step_s=0.5)
    returned_at = [30 + i + 1 for i, log in enumerate(logs) if log is not None]
    assert returned_at == [40, 60]
    assert lines[1].startswith("Iter 40/1000, ETA: 0:08:00, 2.00 it/s")  # 960 steps at 2/s
    assert logs[9] == pytest.approx({"loss": sum(range(31, 41)) / 10, "loss_cls": 0.25})
    assert total_train_steps(make_state(num_steps=500, num_epochs=2)) == 240
    assert total_train_steps(make_state(num_steps=-1, num_epochs=-1)) is None


def test_returns_window_averages_per_key(clock: FakeClock) -> None:
    callback = make_callback(refresh_rate=4)
    state = make_state(num_train_batches=10)

    def metrics(step: int) -> dict[str, Any]:
        values = {"loss": torch.tensor(float(step))}
        if step >= 7:  # e.g. the YOLOX L1 term switched on mid-window
            values["loss_l1"] = torch.tensor(10.0 * step)
        return values

    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    logs = train(callback, state, clock, 10, metrics=metrics)
    assert [i for i, log in enumerate(logs) if log is not None] == [3, 7, 9]  # and the last batch
    assert logs[3] == {"loss": 2.5}
    assert logs[7] == pytest.approx({"loss": 6.5, "loss_l1": 75.0})
    assert logs[9] == pytest.approx({"loss": 9.5, "loss_l1": 95.0})


def test_test_progress_lines(clock: FakeClock, lines: list[str]) -> None:
    callback = make_callback(refresh_rate=3)
    state = make_state(num_test_batches=[7])
    callback.on_test_epoch_start(state, None)  # type: ignore[arg-type]
    for batch_idx in range(7):
        clock.now += 0.5
        callback.on_test_batch_end(state, None, {}, {}, batch_idx)  # type: ignore[arg-type]
    callback.on_test_epoch_end(state, None)  # type: ignore[arg-type]
    assert lines == [
        "Testing 3/7, ETA: 0:00:02, 2.00 it/s",
        "Testing 6/7, ETA: 0:00:00, 2.00 it/s",
        "Testing 7/7, ETA: 0:00:00, 2.00 it/s",
    ]


class CountHostReads(TorchFunctionMode):
    """Counts reads of tensor values on the host (each would sync a GPU)."""

    _reads = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__bool__,
    }

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self._reads:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def as_on_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat CPU metric tensors as if they lived on a GPU (where a host read waits)."""
    monkeypatch.setattr(metric_window, "read_at_once", lambda device: False)


@pytest.mark.parametrize("python_number", [False, True])
def test_no_host_reads_or_log_calls_between_log_steps(
    clock: FakeClock, lines: list[str], python_number: bool, as_on_accelerator: None
) -> None:
    callback = make_callback(refresh_rate=5)
    state = make_state(num_train_batches=100)

    def metrics(step: int) -> dict[str, Any]:
        values: dict[str, Any] = {"loss": torch.tensor(float(step)), "loss_cls": torch.tensor(1.0)}
        if python_number:  # the per-key path must not read tensors either
            values["lr_scale"] = 0.5
        if step >= 3:  # a key appearing mid-window
            values["loss_l1"] = torch.tensor(2.0)
        return values

    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    train(callback, state, clock, 1, metrics=metrics)  # the first-batch line reads its values
    lines.clear()
    with CountHostReads() as reads:
        train(callback, state, clock, 3, metrics=metrics)  # batches 2..4: not log steps
        assert reads.count == 0
        assert lines == []
        logs = train(callback, state, clock, 1, metrics=metrics)  # batch 5: log step
        assert reads.count == 1  # one transfer for all metrics
    assert len(lines) == 1
    expected = {"loss": 3.0, "loss_cls": 1.0, "loss_l1": 2.0}
    if python_number:
        expected["lr_scale"] = 0.5
    assert logs[0] == pytest.approx(expected)


@pytest.mark.parametrize("python_number", [False, True])
@pytest.mark.parametrize("on_accelerator", [False, True])
def test_resume_mid_window_returns_the_same_averages(
    clock: FakeClock, python_number: bool, on_accelerator: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if on_accelerator:
        monkeypatch.setattr(metric_window, "read_at_once", lambda device: False)

    def metrics(step: int) -> dict[str, Any]:
        acc = 0.5 * step
        return {
            "loss": torch.tensor(0.1 * step + 1 / 3),
            "acc": acc if python_number else torch.tensor(acc, dtype=torch.float64),
        }

    straight = make_callback(refresh_rate=4)
    state = make_state(num_train_batches=10)
    straight.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    expected = train(straight, state, clock, 10, metrics=metrics)

    first = make_callback(refresh_rate=4)
    state = make_state(num_train_batches=10)
    first.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    got = train(first, state, clock, 6, metrics=metrics)
    saved = json.loads(json.dumps(first.state_dict()))  # plain numbers, checkpoint-friendly
    assert saved["counts"] == {"acc": 2, "loss": 2}
    resumed = make_callback(refresh_rate=4)
    resumed.load_state_dict(saved)
    resumed.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    got += train(resumed, state, clock, 4, metrics=metrics)
    assert got == expected  # bit-identical floats
    assert resumed.state_dict() == {}  # nothing pending after the epoch's last line
    with pytest.raises(ValueError, match="inconsistent"):
        resumed.load_state_dict({"sums": {"loss": 1.0}, "counts": {}})


def _distributed_logging(rank: int, world_size: int) -> tuple[list[Any], dict[str, Any]]:
    callback = LoggingCallback(refresh_rate=4)
    callback._display = ProgressDisplay()
    state = make_state(num_train_batches=8)
    callback.on_train_epoch_start(state, None, None)  # type: ignore[arg-type]
    logs = train(
        callback,
        state,
        FakeClock(),
        6,
        metrics=lambda step: {"loss": torch.tensor(float((rank + 1) * step))},
    )
    callback.on_save_checkpoint(state, None)  # type: ignore[arg-type]
    return logs, callback.state_dict()


def test_metrics_are_averaged_across_ranks() -> None:
    results = run_distributed(_distributed_logging, 2)
    for logs, saved in results:
        # Batches 1-4: rank 0 averages 2.5, rank 1 averages 5.0.
        assert [log for log in logs if log is not None] == [{"loss": 3.75}]
        # Pending batches 5-6: sums 11 and 22, saved as their mean on every rank.
        assert saved == {"sums": {"loss": 16.5}, "counts": {"loss": 2}}


@pytest.mark.parametrize("on_accelerator", [False, True])
def test_window_sums_mixed_shapes_and_dtypes_and_never_keeps_a_graph(
    on_accelerator: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if on_accelerator:
        monkeypatch.setattr(metric_window, "read_at_once", lambda device: False)
    window = metric_window.MetricWindow()
    for step in range(1, 5):
        window.add(
            {
                "a": torch.tensor(float(step)),  # ()
                "b": torch.tensor([step], dtype=torch.float16),  # (1,), another dtype
                "c": torch.tensor(step),  # integer
            }
        )
    sums = {key: float(value) for key, value in window.snapshot().items()}
    assert sums == {"a": 10.0, "b": 10.0, "c": 10.0}
    assert window.counts == {"a": 4, "b": 4, "c": 4}

    window.clear()
    weight = torch.tensor(2.0, requires_grad=True)
    for step in range(3):
        window.add({"a": weight * step})
        assert not window._pending, "a tensor with a graph must be summed at once, not kept"
    assert window.counts == {"a": 3}
    assert float(window.snapshot()["a"]) == 6.0
    assert not window.snapshot()["a"].requires_grad


def test_cpu_metrics_areread_at_once_and_not_kept() -> None:
    window = metric_window.MetricWindow()
    for step in range(3):
        window.add({"loss": torch.tensor(float(step)), "acc": torch.tensor(0.5)})
    assert window._pending == [], "CPU tensors are summed as floats, not kept alive"
    assert window.counts == {"loss": 3, "acc": 3}
    assert window.snapshot() == {"acc": 1.5, "loss": 3.0}
    window.clear()
    assert window.counts == {} and window.snapshot() == {}
    window.add({"loss": torch.tensor(4.0), "acc": torch.tensor(1.0)})
    assert window.snapshot() == {"acc": 1.0, "loss": 4.0}


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": self.layer(x)}


class _UserMetrics(Callback):
    """A user's callback: train logs every second batch and a validation score."""

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if (batch_idx + 1) % 2 == 0:
            return {"acc": 0.25 * (batch_idx + 1)}
        return None

    def on_test_epoch_end(self, trainer_state, model):  # type: ignore[no-untyped-def]
        return {"my/score": 1.5}


def test_real_run_prints_user_metrics_lr_and_one_epoch_numbering(
    lines: list[str], tmp_path: Any
) -> None:
    """Through the real Trainer: a user's logs on the console, lr in each line, and the mode
    switch, checkpoint names and log lines agreeing on the epoch number."""
    samples = [{"x": torch.randn(2), "y": torch.randn(1)} for _ in range(8)]
    train_loader = DataLoader(samples, batch_size=2)  # type: ignore[arg-type]
    test_loader = DataLoader(samples[:4], batch_size=2)  # type: ignore[arg-type]
    loss = LossModule(
        {
            "loss": torch.nn.MSELoss(),
            "connector": LossConnector({"input": pred_key("pred"), "target": data_key("y")}),
            "name": "mse",
        }
    )
    model = _Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    connector = DataConnector({"x": "x"})
    callbacks = [
        LoggingCallback(refresh_rate=2),
        _UserMetrics(),
        YOLOXModeSwitchCallback(switch_epoch=1),
        CheckpointCallback(save_prefix=str(tmp_path), async_save=False),
    ]
    trainer = Trainer(
        "cpu",
        str(tmp_path),
        train_loader,
        test_loader,
        connector,
        connector,
        callbacks,
        num_epochs=2,
    )
    trainer.fit(model, [optimizer], [], loss)

    assert "Epoch 0: 2/4, _UserMetrics: acc: 0.5000" in lines
    assert "Epoch 1: 4/4, _UserMetrics: acc: 1.0000" in lines
    assert "Validation (epoch 0, step 4): my/score: 1.5000" in lines
    assert "Validation (epoch 1, step 8): my/score: 1.5000" in lines
    train_lines = [line for line in lines if re.match(r"Epoch \d: \d/4, ETA", line)]
    assert len(train_lines) == 5  # first batch + 2 per epoch
    assert all(", lr: 1.000e-01, " in line for line in train_lines)
    end_of_0 = lines.index(next(line for line in train_lines if line.startswith("Epoch 0: 4/4")))
    switch = next(i for i, line in enumerate(lines) if line.startswith("YOLOX mode switch"))
    first_of_1 = lines.index(next(line for line in train_lines if line.startswith("Epoch 1:")))
    assert end_of_0 < switch < first_of_1
    assert lines[switch].startswith("YOLOX mode switch at epoch 0:")
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    assert saved == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
