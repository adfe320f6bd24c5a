"""Tests of the EMA adapters: formula, buffers, routing, re-pairing, set, devices, state dicts."""

from __future__ import annotations

import copy
import io
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from vistrain.model.adapter import ModelEMAAdapter, ModelExpEMAAdapter, find_ema_adapters


class Net(nn.Module):
    """Conv + BN + linear: float params, float BN buffers and an integer BN counter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)
        self.register_buffer("hits", torch.zeros(2, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _train_step(model: nn.Module, seed: int) -> None:
    """A fake optimizer step: moves every parameter and the BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 5, 5, generator=gen, dtype=next(model.parameters()).dtype))
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    model.hits += seed  # type: ignore[operator]


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().double().clone()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def _check_formula(
    adapter: ModelEMAAdapter, steps: list[int], decay_of, rtol: float, atol: float
) -> None:
    ref = _float_state(adapter.ema_model)
    for k in steps:
        _train_step(adapter.model, seed=k)
        adapter.update(k)
        d = decay_of(k)
        model_state = _float_state(adapter.model)
        ref = {n: d * ref[n] + (1.0 - d) * model_state[n] for n in ref}
        ema_state = adapter.ema_model.state_dict()
        for name, expected in ref.items():
            torch.testing.assert_close(ema_state[name].double(), expected, rtol=rtol, atol=atol)
        # integer buffers are copied, never averaged
        assert torch.equal(
            ema_state["bn.num_batches_tracked"], adapter.model.bn.num_batches_tracked
        )
        assert torch.equal(ema_state["hits"], adapter.model.hits)


EXP_STEPS = [1, 2, 3, 4, 5, 6, 40, 41, 42, 5000]


def _exp_decay(k: int) -> float:
    return 0.99 * (1.0 - math.exp(-k / 5.0))


def test_exp_decay_float32_matches_float64_reference() -> None:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(Net(), decay=0.99, warmup_steps=5)
    _check_formula(adapter, EXP_STEPS, _exp_decay, rtol=2e-6, atol=1e-6)
    assert int(adapter.num_updates) == len(EXP_STEPS)


def test_exp_decay_float64_model_is_exact_to_rounding() -> None:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(Net().double(), decay=0.99, warmup_steps=5)
    _check_formula(adapter, EXP_STEPS, _exp_decay, rtol=1e-13, atol=1e-14)


def test_exp_decay_values_ramp_up_to_decay() -> None:
    adapter = ModelExpEMAAdapter(Net(), decay=0.9998, warmup_steps=2000)
    assert adapter.decay_at(1) == pytest.approx(0.9998 * (1 - math.exp(-1 / 2000)), rel=1e-14)
    assert adapter.decay_at(1) < 1e-3  # first update: EMA ~ model
    assert adapter.decay_at(100_000) == pytest.approx(0.9998, rel=1e-12)


def test_first_exp_update_tracks_the_model() -> None:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(Net(), decay=0.9998, warmup_steps=2000)
    before = _float_state(adapter.ema_model)
    _train_step(adapter.model, seed=1)
    adapter.update(1)
    d = 0.9998 * (1 - math.exp(-1 / 2000))
    for name, value in adapter.ema_model.state_dict().items():
        if value.is_floating_point():
            expected = d * before[name] + (1 - d) * adapter.model.state_dict()[name].double()
            torch.testing.assert_close(value.double(), expected, rtol=2e-6, atol=1e-7)


def test_constant_decay_adapter_ignores_step() -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.9)
    assert adapter.decay_at(1) == adapter.decay_at(10**6) == 0.9
    _check_formula(adapter, [1, 2, 3, 7, 1000], lambda k: 0.9, rtol=2e-6, atol=1e-6)


def test_update_without_step_counts_updates() -> None:
    torch.manual_seed(0)
    a = ModelExpEMAAdapter(Net(), decay=0.99, warmup_steps=5)
    b = copy.deepcopy(a)
    for k in (1, 2, 3):
        _train_step(a.model, k)
        _train_step(b.model, k)
        a.update()
        b.update(k)
    # the counter buffer is current in the state dict (read first, before any attribute access)
    assert a.state_dict()["num_updates"].item() == 3
    assert b.state_dict()["num_updates"].item() == 3
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name
    assert int(a.num_updates) == 3


def test_integer_and_bool_buffers_are_copied_exactly() -> None:
    model = Net()
    model.register_buffer("mask", torch.tensor([True, False]))
    adapter = ModelEMAAdapter(model, decay=0.5)
    model.bn.num_batches_tracked.fill_(1000)
    model.hits.copy_(torch.tensor([7, 2**40]))
    model.mask.logical_not_()
    adapter.update(1)
    ema = adapter.ema_model
    assert ema.bn.num_batches_tracked.item() == 1000
    assert ema.hits.tolist() == [7, 2**40]
    assert ema.mask.tolist() == [False, True]


def test_tied_parameters_are_averaged_once() -> None:
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    adapter = ModelEMAAdapter(model, decay=0.5)
    start = adapter.ema_model[0].weight.detach().clone()
    assert adapter.ema_model[1].weight is adapter.ema_model[0].weight
    with torch.no_grad():
        model[0].weight.add_(1.0)
    adapter.update(1)
    torch.testing.assert_close(adapter.ema_model[0].weight, start + 0.5, rtol=0, atol=1e-6)


def test_pairs_by_name_not_position() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.a = nn.Linear(2, 2)
    model.b = nn.Linear(2, 2)
    adapter = ModelEMAAdapter(model, decay=0.5)
    # Same names, reversed registration order: positional pairing would mix a and b.
    model._modules = OrderedDict(reversed(list(model._modules.items())))
    ema_a = adapter.ema_model.a.weight.detach().clone()
    with torch.no_grad():
        model.a.weight.add_(10.0)
    adapter.update(1)
    torch.testing.assert_close(adapter.ema_model.a.weight, ema_a + 5.0)
    torch.testing.assert_close(adapter.ema_model.b.weight, model.b.weight)


def test_routing_train_and_eval() -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(nn.Linear(3, 2), decay=0.5)
    with torch.no_grad():
        adapter.model.weight.add_(1.0)
    x = torch.randn(4, 3)
    adapter.train()
    assert adapter.training and adapter.model.training and not adapter.ema_model.training
    torch.testing.assert_close(adapter(x), adapter.model(x))
    adapter.eval()
    assert not adapter.ema_model.training
    torch.testing.assert_close(adapter(x), adapter.ema_model(x))
    assert not torch.allclose(adapter(x), adapter.model(x))
    assert adapter.eval_weights == "ema"

    plain = ModelEMAAdapter(adapter.model, decay=0.5, use_ema_during_test=False)
    plain.eval()
    with torch.no_grad():
        plain.model.weight.add_(1.0)
    torch.testing.assert_close(plain(x), plain.model(x))
    assert plain.eval_weights == "model"


def test_ema_copy_is_frozen_and_gets_no_grads() -> None:
    model = nn.Linear(3, 2)
    model(torch.randn(1, 3)).sum().backward()
    adapter = ModelEMAAdapter(model)
    assert all(p.grad is None and not p.requires_grad for p in adapter.ema_model.parameters())
    adapter.requires_grad_(True)
    assert not any(p.requires_grad for p in adapter.ema_model.parameters())
    adapter.train()
    adapter(torch.randn(2, 3)).sum().backward()
    assert all(p.grad is None for p in adapter.ema_model.parameters())
    adapter.update(1)
    assert not any(p.requires_grad for p in adapter.ema_model.parameters())


def _assert_half_way(adapter: ModelEMAAdapter, before: dict[str, torch.Tensor]) -> None:
    """After an update with decay 0.5: every float EMA tensor is the mean of old EMA and model."""
    model_state = _float_state(adapter.model)
    for name, value in _float_state(adapter.ema_model).items():
        torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * model_state[name])


def _replacement_state(adapter: ModelEMAAdapter) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() + 1.0 if v.is_floating_point() else v.clone()
        for k, v in adapter.model.state_dict().items()
    }


def test_adapter_load_state_dict_with_assign_repairs() -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.5)
    adapter.update(1)
    # Loading through the adapter replaces every tensor (model and EMA copy) with assign=True;
    # the next update must average the new tensors, not the dropped ones.
    state = {
        k: v.clone() + (1.0 if k.startswith("model.") else 0.0) if v.is_floating_point() else v
        for k, v in adapter.state_dict().items()
    }
    old_weight = adapter.model.fc.weight
    adapter.load_state_dict(state, assign=True)
    assert adapter.model.fc.weight is not old_weight
    before = _float_state(adapter.ema_model)
    _train_step(adapter.model, 2)
    adapter.update(2)
    _assert_half_way(adapter, before)


@pytest.mark.parametrize(
    "replace",
    [
        pytest.param(
            lambda a: a.model.load_state_dict(_replacement_state(a), assign=True), id="assign"
        ),
        pytest.param(lambda a: setattr(a.model, "fc", nn.Linear(100, 3)), id="submodule"),
        pytest.param(
            lambda a: setattr(a.model.bn, "running_mean", torch.full((4,), 8.0)), id="buffer"
        ),
    ],
)
def test_refresh_after_replacing_model_tensors(replace) -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.5)
    adapter.update(1)
    replace(adapter)
    adapter.refresh()
    before = _float_state(adapter.ema_model)
    _train_step(adapter.model, 2)
    adapter.update(2)
    _assert_half_way(adapter, before)


def test_conversion_of_a_parent_module_repairs() -> None:
    # The engines move a module that holds the adapter: the adapter's own _apply runs.
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.5)
    adapter.update(1)
    nn.Sequential(adapter).double()
    assert adapter.model.fc.weight.dtype == adapter.ema_model.fc.weight.dtype == torch.float64
    before = _float_state(adapter.ema_model)
    _train_step(adapter.model, 2)
    adapter.update(2)
    _assert_half_way(adapter, before)


def test_conversion_that_overwrites_parameters_repairs() -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.5)
    adapter.update(1)
    old_weight = adapter.model.fc.weight
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        adapter.to(torch.float64)  # new Parameter objects, not new .data
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert adapter.model.fc.weight is not old_weight
    before = _float_state(adapter.ema_model)
    _train_step(adapter.model, 2)
    adapter.update(2)
    _assert_half_way(adapter, before)


def test_set_copies_the_live_weights() -> None:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(Net(), decay=0.99, warmup_steps=5)
    for k in (1, 2):
        _train_step(adapter.model, k)
        adapter.update(k)
    _train_step(adapter.model, 3)
    adapter.set()
    for name, value in adapter.model.state_dict().items():
        assert torch.equal(adapter.ema_model.state_dict()[name], value), name
    assert int(adapter.num_updates) == 2  # set is not an update
    # The EMA copy stays frozen and keeps its own storage.
    assert not any(p.requires_grad for p in adapter.ema_model.parameters())
    with torch.no_grad():
        adapter.model.fc.weight.add_(1.0)
    assert not torch.equal(adapter.ema_model.fc.weight, adapter.model.fc.weight)


def test_set_from_another_model_converts_and_checks_names() -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.5)
    other = Net().double()
    adapter.set(nn.DataParallel(other))
    assert adapter.ema_model.fc.weight.dtype == torch.float32
    torch.testing.assert_close(adapter.ema_model.fc.weight, other.fc.weight.float())
    assert torch.equal(adapter.ema_model.hits, other.hits)
    with pytest.raises(RuntimeError, match="same tensors"):
        adapter.set(nn.Linear(2, 2))


def test_adapter_to_dtype_moves_both_and_keeps_updating() -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.5)
    adapter.update(1)
    adapter.to(torch.float64)
    assert adapter.ema_model.fc.weight.dtype == torch.float64
    before = _float_state(adapter.ema_model)
    _train_step(adapter.model, 2)
    adapter.update(2)
    after = _float_state(adapter.ema_model)
    model_state = _float_state(adapter.model)
    for name in before:
        torch.testing.assert_close(after[name], 0.5 * before[name] + 0.5 * model_state[name])


def test_diverged_model_is_a_clear_error() -> None:
    adapter = ModelEMAAdapter(Net())
    adapter.model.double()  # the model alone, not the adapter
    with pytest.raises(RuntimeError, match=r"adapter\.to"):
        adapter.update(1)
    adapter = ModelEMAAdapter(Net())
    adapter.model.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="extra"):
        adapter.update(1)


def test_device_argument_pins_the_ema_copy() -> None:
    torch.manual_seed(0)
    adapter = ModelEMAAdapter(Net(), decay=0.5, device="cpu")
    assert adapter.ema_model.fc.weight.device == torch.device("cpu")
    # Pinned: converting the adapter converts only the trained model.
    adapter.to(torch.float64)
    assert adapter.model.fc.weight.dtype == torch.float64
    assert adapter.ema_model.fc.weight.dtype == torch.float32
    before = _float_state(adapter.ema_model)
    _train_step(adapter.model, 1)
    adapter.update(1)
    model_state = _float_state(adapter.model)
    for name, value in _float_state(adapter.ema_model).items():
        expected = 0.5 * before[name] + 0.5 * model_state[name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(
        adapter.ema_model.bn.num_batches_tracked, adapter.model.bn.num_batches_tracked
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ema_copy_on_cpu_for_a_gpu_model() -> None:
    torch.manual_seed(0)
    adapter = ModelExpEMAAdapter(Net(), decay=0.99, warmup_steps=5, device="cpu").cuda()
    assert adapter.model.fc.weight.is_cuda and not adapter.ema_model.fc.weight.is_cuda
    ref = _float_state(adapter.ema_model)
    for k in (1, 2, 3):
        _train_step(adapter.model, k)
        adapter.update(k)
        d = _exp_decay(k)
        model_state = {n: v.cpu() for n, v in _float_state(adapter.model).items()}
        ref = {n: d * ref[n] + (1 - d) * model_state[n] for n in ref}
    for name, value in _float_state(adapter.ema_model).items():
        torch.testing.assert_close(value, ref[name], rtol=2e-6, atol=1e-6)
    assert adapter.ema_model.bn.num_batches_tracked.item() == 3
    adapter.eval()
    out = adapter.ema_model(torch.randn(1, 3, 5, 5))
    assert out.device.type == "cpu"


def _run(adapter: ModelEMAAdapter, steps: range, explicit_step: bool) -> None:
    for k in steps:
        _train_step(adapter.model, k)
        adapter.update(k if explicit_step else None)


@pytest.mark.parametrize("explicit_step", [True, False])
def test_state_dict_round_trip_is_bit_exact(explicit_step: bool) -> None:
    torch.manual_seed(0)
    straight = ModelExpEMAAdapter(Net(), decay=0.99, warmup_steps=5)
    stopped = copy.deepcopy(straight)
    _run(straight, range(1, 8), explicit_step)

    _run(stopped, range(1, 4), explicit_step)
    buffer = io.BytesIO()
    torch.save(stopped.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a fresh adapter with different weights
    resumed = ModelExpEMAAdapter(Net(), decay=0.99, warmup_steps=5)
    resumed.update(1)  # and a different counter: all of it must be overwritten
    resumed.load_state_dict(torch.load(buffer))
    assert int(resumed.num_updates) == 3
    _run(resumed, range(4, 8), explicit_step)

    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert any(k.startswith("ema_model.") for k in straight.state_dict())
    assert int(resumed.num_updates) == 7


def test_deepcopy_gets_its_own_pairs() -> None:
    adapter = ModelEMAAdapter(Net(), decay=0.5)
    adapter.update(1)
    clone = copy.deepcopy(adapter)
    original = adapter.ema_model.fc.weight.detach().clone()
    with torch.no_grad():
        clone.model.fc.weight.add_(1.0)
    clone.update(2)
    assert torch.equal(adapter.ema_model.fc.weight, original)
    assert not torch.equal(clone.ema_model.fc.weight, original)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_bad_decay_is_value_error(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        ModelEMAAdapter(nn.Linear(1, 1), decay=decay)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="decay"):
        ModelEMAAdapter(nn.Linear(1, 1), decay="0.9")  # type: ignore[arg-type]
    for warmup in (0, 0.5, -3, float("inf")):
        with pytest.raises(ValueError, match="warmup_steps"):
            ModelExpEMAAdapter(nn.Linear(1, 1), warmup_steps=warmup)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="warmup_steps"):
        ModelExpEMAAdapter(nn.Linear(1, 1), warmup_steps="10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ModelEMAAdapter(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already wrapped"):
        ModelEMAAdapter(nn.DataParallel(nn.Linear(1, 1)))
    with pytest.raises(TypeError, match="already wrapped"):
        ModelEMAAdapter(ModelEMAAdapter(nn.Linear(1, 1)))
    with pytest.raises(ValueError, match="device"):
        ModelEMAAdapter(nn.Linear(1, 1), device="not-a-device")
    adapter = ModelEMAAdapter(nn.Linear(1, 1))
    for step in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            adapter.update(step)  # type: ignore[arg-type]
    assert int(adapter.num_updates) == 0


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_find_ema_adapters_through_wrappers() -> None:
    adapter = ModelEMAAdapter(nn.Linear(2, 2))
    assert find_ema_adapters(adapter) == [adapter]
    nested = nn.DataParallel(Wrapper(nn.Sequential(nn.ReLU(), nn.DataParallel(adapter))))
    assert find_ema_adapters(nested) == [adapter]
    assert find_ema_adapters(nn.Linear(2, 2)) == []
    # An adapter inside another adapter's model belongs to the outer one.
    outer = ModelEMAAdapter(Wrapper(ModelEMAAdapter(nn.Linear(2, 2))))
    assert find_ema_adapters(Wrapper(outer)) == [outer]
    # Two independent adapters are both found, in module order.
    second = ModelEMAAdapter(nn.Linear(2, 2))
    assert find_ema_adapters(nn.ModuleList([adapter, Wrapper(second), adapter])) == [
        adapter,
        second,
    ]
