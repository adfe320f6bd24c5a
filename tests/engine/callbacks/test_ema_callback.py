"""Tests of EMACallback: finding the adapter, step semantics, accumulation, resume, DDP."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_utils import run_distributed
from trainer_fixtures import ENGINES, ToyModel, run_toy
from vistrain.engine.callbacks import ema as ema_module
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.model.adapter import ModelEMAAdapter, ModelExpEMAAdapter


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _state(global_step: int) -> TrainerState:
    return TrainerState(
        current_epoch=0,
        num_epochs=1,
        global_step=global_step,
        num_steps=-1,
        train_dataloader=None,
        num_train_batches=None,
        test_dataloader=None,
        num_test_batches=None,
    )


def _batch_end(
    callback: EMACallback, model: nn.Module, global_step: int, batch_idx: int = 0
) -> Any:
    return callback.on_train_batch_end(_state(global_step), model, None, {}, {}, batch_idx)  # type: ignore[arg-type]


def _optimizer_step(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()
        model(torch.randn(2, 3, 4, 4, generator=gen))
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        assert torch.equal(value, sb[name]), name


def test_is_a_callback_with_seed_signature() -> None:
    callback = EMACallback(epoch_based=False)
    assert isinstance(callback, Callback)
    assert callback.epoch_based is False
    assert callback.train_connector is None and callback.test_connector is None


def test_updates_with_global_step() -> None:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(SmallNet(), decay=0.99, warmup_steps=50)
    reference = copy.deepcopy(adapter)
    callback = EMACallback()
    for global_step in (101, 102, 103):  # e.g. a run that resumed at step 100
        _optimizer_step(adapter.model, global_step)
        _optimizer_step(reference.model, global_step)
        assert _batch_end(callback, adapter, global_step) is None
        reference.update(global_step)
    _assert_same_state(adapter, reference)
    # The step given is the global step, not the number of updates: d_101, not d_1.
    assert int(adapter.num_updates) == 3
    assert reference.decay_at(101) == pytest.approx(0.99 * (1 - math.exp(-101 / 50)))


def test_gradient_accumulation_updates_once_per_optimizer_step() -> None:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(SmallNet(), decay=0.9, warmup_steps=2)
    reference = copy.deepcopy(adapter)
    callback = EMACallback()
    # accumulate 2: the optimizer steps on every second batch
    global_steps = [0, 1, 1, 2, 2, 3]
    previous = 0
    for batch_idx, global_step in enumerate(global_steps):
        if global_step != previous:
            _optimizer_step(adapter.model, global_step)
            _optimizer_step(reference.model, global_step)
            reference.update(global_step)
            previous = global_step
        _batch_end(callback, adapter, global_step, batch_idx)
    assert int(adapter.num_updates) == 3
    _assert_same_state(adapter, reference)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda a: a,
        lambda a: Wrapper(a),
        lambda a: nn.DataParallel(a),
        lambda a: nn.DataParallel(Wrapper(nn.Sequential(nn.DataParallel(a)))),
    ],
    ids=["bare", "custom-wrapper", "dataparallel", "nested"],
)
def test_finds_adapter_inside_wrappers(wrap: Any) -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(SmallNet(), decay=0.5)
    model = wrap(adapter)
    _optimizer_step(adapter.model, 1)
    expected = 0.5 * adapter.ema_model.fc.weight + 0.5 * adapter.model.fc.weight.detach()
    callback = EMACallback()
    _batch_end(callback, model, 1)
    torch.testing.assert_close(adapter.ema_model.fc.weight, expected)
    assert callback.adapters(model) == (adapter,)


def test_adapter_lookup_is_cached_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[nn.Module] = []
    real_find = ema_module.find_ema_adapters

    def counting_find(model: nn.Module) -> list[ModelEMAAdapter]:
        calls.append(model)
        return real_find(model)

    monkeypatch.setattr(ema_module, "find_ema_adapters", counting_find)
    model = Wrapper(ModelEMAAdapter(SmallNet()))
    callback = EMACallback()
    for step in range(1, 5):
        _batch_end(callback, model, step)
    assert len(calls) == 1
    other = Wrapper(ModelEMAAdapter(SmallNet()))
    _batch_end(callback, other, 5)
    assert len(calls) == 2


def test_model_without_adapter_is_type_error() -> None:
    callback = EMACallback()
    with pytest.raises(TypeError, match="ModelEMAAdapter"):
        _batch_end(callback, nn.DataParallel(SmallNet()), 1)
    # no optimizer step yet: nothing to do, no lookup
    assert _batch_end(EMACallback(), SmallNet(), 0) is None


@pytest.mark.parametrize("bad", [{}, {"last_step": -1}, {"last_step": "3"}, {"last_step": 2.5}])
def test_bad_callback_state_is_value_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="last_step"):
        EMACallback().load_state_dict(bad)


def _ddp_ema(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(SmallNet(), decay=0.9, warmup_steps=2)
    model = DistributedDataParallel(adapter)
    optimizer = torch.optim.SGD(adapter.model.parameters(), lr=0.5)
    callback = EMACallback()
    ref = {
        k: v.double() if v.is_floating_point() else v.clone()
        for k, v in adapter.ema_model.state_dict().items()
    }
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    model.train()
    for step in range(1, 5):
        loss = model(torch.randn(4, 3, 4, 4, generator=gen)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _batch_end(callback, model, step)
        d = 0.9 * (1 - math.exp(-step / 2))
        live = adapter.model.state_dict()
        ref = {
            k: d * v + (1 - d) * live[k].double() if v.is_floating_point() else live[k].clone()
            for k, v in ref.items()
        }
    ema = adapter.ema_model.state_dict()
    max_err = {k: float((ema[k].double() - ref[k]).abs().max()) for k in ref}
    return {
        "ema": {k: v.clone() for k, v in ema.items()},
        "max_err": max_err,
        "num_updates": int(adapter.num_updates),
    }


def test_ddp_ranks_keep_identical_ema() -> None:
    results = run_distributed(_ddp_ema, 2)
    # DDP broadcasts rank 0's buffers (the EMA copy's too) at every forward, so rank 0's
    # EMA is the one checkpoints hold: all of it follows the formula there.
    assert max(results[0]["max_err"].values()) < 1e-6
    param_names = [k for k in results[0]["ema"] if "running" not in k and "batches" not in k]
    for result in results:
        assert result["num_updates"] == 4
        assert max(result["max_err"][k] for k in param_names) < 1e-6
    # Parameters are all-reduced: every rank holds the same EMA parameters, bit for bit.
    for name in param_names:
        assert torch.equal(results[0]["ema"][name], results[1]["ema"][name]), name


@pytest.mark.parametrize("engine", ENGINES)
def test_under_an_engine_the_ema_follows_every_step_and_resumes_bit_exact(
    tmp_path: Path, engine: str
) -> None:
    """Real loops: the EMA is updated once per optimizer step with the engine's global step,
    and a run stopped mid-epoch and resumed ends with the straight run's EMA weights."""
    if engine == "lightning":
        pytest.importorskip("lightning")

    def adapter() -> ModelExpEMAAdapter:
        torch.manual_seed(0)
        return ModelExpEMAAdapter(ToyModel(), decay=0.9, warmup_steps=4)

    straight = adapter()
    run_toy(engine, str(tmp_path / "straight"), [EMACallback()], model=straight, num_epochs=2)
    assert int(straight.num_updates) == 12  # 6 steps per epoch
    assert not torch.equal(straight.ema_model.net[0].weight, straight.model.net[0].weight)

    part = tmp_path / "part"
    saver = CheckpointCallback(save_prefix=str(part), epoch_based=False, checkpoint_period=8)
    run_toy(engine, str(part), [EMACallback(), saver], model=adapter(), num_steps=8)
    resumed = adapter()
    ckpt = str(part / "checkpoints" / "epoch=1-step=8.ckpt")
    run_toy(engine, str(tmp_path / "resumed"), [EMACallback()], model=resumed, ckpt_path=ckpt)
    assert int(resumed.num_updates) == 12
    _assert_same_state(resumed, straight)
