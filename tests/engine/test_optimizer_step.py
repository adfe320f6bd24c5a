"""OptimizerStepper: a hand-written mixed-precision, accumulated, clipped loop's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vistrain.engine.optimizer_step import OptimizerStepper, check_step_options


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 8, generator=gen) * 3, torch.randint(0, 3, (4,), generator=gen))
        for _ in range(n)
    ]


def _hand_written(model: nn.Module, batches, accumulate: int, clip: float) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for idx, (x, y) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        (loss / accumulate).backward()
        if (idx + 1) % accumulate == 0 or idx == len(batches) - 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


def _stepper_loop(model: nn.Module, batches, stepper: OptimizerStepper) -> list[bool]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    steps = []
    for idx, (x, y) in enumerate(batches):
        with stepper.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        stepper.backward(loss)
        if stepper.window_full(idx, idx == len(batches) - 1):
            steps.append(stepper.step([opt]))
    return steps


def test_bf16_accumulated_clipped_steps_equal_a_hand_written_loop_bit_for_bit() -> None:
    batches = _batches(7)  # 3 full windows of 2 and a partial one of 1
    expected = _hand_written(_model(), batches, accumulate=2, clip=1.0)
    stepper = OptimizerStepper(
        torch.device("cpu"), "bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=1.0
    )
    got = _model()
    assert _stepper_loop(got, batches, stepper) == [True] * 4
    for (name, a), b in zip(expected.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), name
    # The clipping did something: without it the weights differ.
    unclipped = _model()
    _stepper_loop(unclipped, batches, OptimizerStepper(torch.device("cpu"), "bf16-mixed", 2))
    assert not torch.equal(unclipped[0].weight, got[0].weight)


def test_autocast_runs_the_forward_in_bf16_only_when_asked() -> None:
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with OptimizerStepper(torch.device("cpu"), "bf16-mixed").autocast():
        assert layer(x).dtype == torch.bfloat16
    with OptimizerStepper(torch.device("cpu"), "32").autocast():
        assert layer(x).dtype == torch.float32


def test_fp16_overflow_skips_the_step_and_backs_off_the_scale() -> None:
    model = _model()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = OptimizerStepper(torch.device("cpu"), "16-mixed")
    scale = stepper.scaler.get_scale()
    x, y = _batches(1)[0]
    with stepper.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    stepper.backward(loss * float("inf"))
    assert stepper.step([opt]) is False
    assert stepper.skipped_steps == 1
    assert stepper.scaler.get_scale() < scale
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    # A finite loss then steps, and the scaler's state round-trips through a checkpoint.
    with stepper.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    stepper.backward(loss)
    assert stepper.step([opt]) is True
    restored = OptimizerStepper(torch.device("cpu"), "16-mixed")
    restored.load_state_dict(stepper.state_dict())
    assert restored.scaler.get_scale() == stepper.scaler.get_scale()
    assert restored.skipped_steps == 1


def test_hook_sees_unscaled_gradients_and_norm_is_kept_as_a_tensor() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batches(1)[0]
    reference = _model()
    nn.functional.cross_entropy(reference(x), y).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])

    seen = []
    stepper = OptimizerStepper(torch.device("cpu"), "16-mixed", gradient_clip_val=1e9)
    stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # no overflow on step 1
    with stepper.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    stepper.backward(loss)
    stepper.step([opt], before_step=lambda o: seen.append(model[0].weight.grad.abs().max().item()))
    assert seen and seen[0] == pytest.approx(reference[0].weight.grad.abs().max().item(), rel=5e-2)
    assert isinstance(stepper.grad_norm, torch.Tensor)
    assert stepper.grad_norm.item() == pytest.approx(want.item(), rel=5e-2)

    # Clipping by value bounds every element's update by lr * val; the norm is still reported.
    value_clip = OptimizerStepper(
        torch.device("cpu"), gradient_clip_val=1e-4, gradient_clip_algorithm="value"
    )
    before = [p.detach().clone() for p in model.parameters()]
    plain_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    assert value_clip.step([plain_opt], want_norm=True)
    assert value_clip.grad_norm is not None and value_clip.grad_norm.item() > 1e-3
    moves = [(p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)]
    assert 0 < max(moves) <= 0.1 * 1e-4 * 1.01  # unclipped moves are ~1e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "16"}, "precision='16' is not one of 32, bf16-mixed, 16-mixed"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches=0"),
        ({"accumulate_grad_batches": 1.5}, "accumulate_grad_batches=1.5"),
        ({"gradient_clip_val": float("nan")}, "gradient_clip_val=nan"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val=-1.0"),
        (
            {"gradient_clip_algorithm": "max"},
            "gradient_clip_algorithm='max' is not one of norm, value",
        ),
    ],
)
def test_bad_options_are_refused_with_the_value_and_the_choices(kwargs, message) -> None:
    options = {
        "precision": "32",
        "accumulate_grad_batches": 1,
        "gradient_clip_val": None,
        "gradient_clip_algorithm": "norm",
        **kwargs,
    }
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_step_options(**options)


@pytest.mark.parametrize(
    ("precision", "accumulate", "plain"),
    [("32", 1, True), ("bf16-mixed", 1, True), ("32", 2, False), ("16-mixed", 1, False)],
)
def test_plain_backward_is_claimed_only_where_backward_changes_nothing(
    precision, accumulate, plain
) -> None:
    """Engines call loss.backward() themselves where this says so: it must equal backward()."""
    stepper = OptimizerStepper(torch.device("cpu"), precision, accumulate)
    assert stepper.plain_backward is plain
    grads = []
    for direct in (False, True):
        weight = torch.ones(3, requires_grad=True)
        loss = (weight * torch.arange(3.0)).sum()
        loss.backward() if direct else stepper.backward(loss)
        grads.append(weight.grad)
    assert torch.equal(grads[0], grads[1]) is plain
