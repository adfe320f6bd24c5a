"""What callbacks see from the shared loop bookkeeping, under both engines.

Each hook gets a TrainerState of its own; ``metrics`` read as floats (the seed's
``dict[str, float]``) while staying tensors until someone reads them; ``TrainerState``'s
annotations resolve.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
import torch
from torch.optim import Optimizer

from trainer_fixtures import ENGINES, run_toy
from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.trainer_state import StepMetrics, TrainerState, metric_tensors
from vistrain.engine.optim import LRSchedulerWrapper


def test_trainer_state_type_hints_resolve() -> None:
    hints = typing.get_type_hints(TrainerState)
    assert hints["lr_schedulers"] == list[LRSchedulerWrapper]
    assert hints["optimizers"] == list[Optimizer]
    assert "metrics" in hints and "val_logs" in hints


class _Unreadable:
    """A metric value that fails when converted: proves a conversion happened."""

    def __float__(self) -> float:
        raise AssertionError("converted to float")


def test_step_metrics_convert_only_on_reading() -> None:
    loss = torch.tensor(0.25)
    metrics = StepMetrics({"loss": loss, "other": _Unreadable()})
    assert list(metrics) == ["loss", "other"] and len(metrics) == 2  # no conversion
    assert metrics.tensors()["loss"] is loss  # the tensor itself, no copy, no sync
    assert metrics["loss"] == 0.25 and isinstance(metrics["loss"], float)
    with pytest.raises(AssertionError, match="converted"):
        metrics["other"]
    with pytest.raises(TypeError):
        metrics["loss"] = 1.0  # type: ignore[index]
    assert metric_tensors({"metrics": {"loss": loss}}) == {"loss": loss}  # a hand-built state
    assert metric_tensors({}) is None


class _StateProbe(Callback):
    """Writes into the states it gets and checks no later hook sees the writes; reads
    metrics the way a callback written to the seed's ``dict[str, float]`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []
        self.metric_lines: list[str] = []
        self.state_ids: set[int] = set()

    def _check_and_scribble(self, hook: str, state: Any) -> None:
        assert "scribble" not in state, f"{hook} saw what an earlier hook wrote"
        assert state["global_step"] >= 0
        self.state_ids.add(id(state))
        self.seen.append((hook, state["global_step"]))
        state["scribble"] = hook
        state["global_step"] = -100
        state["val_logs"] = {"scribbled": 1.0}

    def on_train_epoch_start(self, trainer_state, model, loss_module) -> None:
        self._check_and_scribble("train_epoch_start", trainer_state)

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        assert "metrics" not in trainer_state  # metrics belong to on_train_batch_end
        self._check_and_scribble("train_batch_start", trainer_state)

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        metrics = trainer_state["metrics"]
        self.metric_lines.append(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
        self._check_and_scribble("train_batch_end", trainer_state)
        return None

    def on_train_epoch_end(self, trainer_state, model, loss_module) -> None:
        self._check_and_scribble("train_epoch_end", trainer_state)

    def on_test_epoch_end(self, trainer_state, model):
        self._check_and_scribble("test_epoch_end", trainer_state)
        return {"score": 0.5}

    def on_validation_end(self, trainer_state, model) -> None:
        assert trainer_state["val_logs"] == {"score": 0.5}
        self._check_and_scribble("validation_end", trainer_state)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_hook_gets_its_own_state_and_float_metrics(tmp_path, engine: str) -> None:
    if engine == "lightning":
        pytest.importorskip("lightning")
    first = _StateProbe()
    run_toy(engine, str(tmp_path), [first], num_train=8, num_epochs=2)
    assert len(first.state_ids) > 1
    assert len(first.metric_lines) == 4
    losses = [json.loads(line)["mse"] for line in first.metric_lines]
    assert all(isinstance(loss, float) and loss > 0 for loss in losses)
    assert [hook for hook, _ in first.seen].count("validation_end") == 2
    assert [step for hook, step in first.seen if hook == "train_batch_end"] == [1, 2, 3, 4]
