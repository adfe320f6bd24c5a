from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import LinearLR, MultiStepLR, StepLR

from vistrain.engine.optim import LRSchedulerConfig, LRSchedulerWrapper, warmup_cosine


def _run(
    sched: LRSchedulerWrapper, opt: torch.optim.Optimizer, epochs: int, steps: int, start: int = 0
):
    lrs = []
    g = start * steps
    for e in range(start, epochs):
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            g += 1
            sched.step_on_batch(g)
        sched.step(e)
    return lrs


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_warmup_then_cosine_values() -> None:
    opt = _opt()
    lrs = _run(
        warmup_cosine(
            opt, warmup_steps=3, num_epochs=4, warmup_start_factor=0.1, min_lr_factor=0.0
        ),
        opt,
        4,
        3,
    )
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[1] == pytest.approx(0.4)
    assert lrs[3] == pytest.approx(1.0)
    for epoch in (2, 3):
        expected = 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 3))
        assert lrs[epoch * 3] == pytest.approx(expected)


def test_state_dict_resumes_exactly() -> None:
    opt = _opt()
    sched = warmup_cosine(opt, warmup_steps=4, num_epochs=6)
    straight = _run(sched, opt, 6, 3)
    opt2 = _opt()
    sched2 = warmup_cosine(opt2, warmup_steps=4, num_epochs=6)
    _run(sched2, opt2, 2, 3)
    state = sched2.state_dict()
    opt3 = _opt()
    sched3 = warmup_cosine(opt3, warmup_steps=4, num_epochs=6)
    sched3.load_state_dict(state)
    resumed = _run(sched3, opt3, 6, 3, start=2)
    assert resumed == straight[6:]


def test_window_and_type_errors() -> None:
    opt = _opt()
    with pytest.raises(ValueError, match="window"):
        LRSchedulerWrapper(opt, [LRSchedulerConfig(StepLR, {"step_size": 1}, begin=3, end=2)])
    with pytest.raises(TypeError, match="LRScheduler class"):
        LRSchedulerWrapper(opt, [LRSchedulerConfig(int, {})])
    sched = LRSchedulerWrapper(opt, [LRSchedulerConfig(StepLR, {"step_size": 1, "gamma": 0.5})])
    with pytest.raises(ValueError, match="schedule configuration changed"):
        sched.load_state_dict({"schedulers": [None, None], "lrs": [1.0]})


def test_linear_warmup_window_finishes_at_the_base_lr() -> None:
    """The module docstring's example: LinearLR(total_iters=500) in [0, 500) is stepped 500
    times (vis4d's convention), so the warm-up ends at exactly the base learning rate."""
    opt = _opt()
    sched = LRSchedulerWrapper(
        opt,
        [LRSchedulerConfig(LinearLR, {"start_factor": 0.01, "total_iters": 500}, 0, 500, False)],
    )
    for step in range(1, 501):
        opt.step()
        sched.step_on_batch(step)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0, abs=1e-12)
    sched.step_on_batch(501)  # outside the window: never stepped again
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0, abs=1e-12)


def test_schedule_from_a_vis4d_config_gives_vis4d_learning_rates() -> None:
    """A vis4d-style schedule (faster R-CNN's: step-based linear warm-up, epoch-based
    multi-step decay, scaled down) gives, before each step, the rate vis4d's convention
    defines: base * warm-up factor(steps done) * gamma ** (milestones passed)."""
    base, start, warmup, steps_per_epoch = 0.02, 0.1, 4, 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = LRSchedulerWrapper(
        opt,
        [
            LRSchedulerConfig(
                LinearLR, {"start_factor": start, "total_iters": warmup}, 0, warmup, False
            ),
            LRSchedulerConfig(MultiStepLR, {"milestones": [2, 3], "gamma": 0.1}, 0, 4, True),
        ],
    )
    lrs = _run(sched, opt, 4, steps_per_epoch)
    expected = []
    for step in range(4 * steps_per_epoch):
        epochs_done = step // steps_per_epoch
        warm = start + (1 - start) * min(step, warmup) / warmup
        expected.append(base * warm * 0.1 ** sum(epochs_done >= m for m in (2, 3)))
    assert lrs == pytest.approx(expected, rel=1e-9)
    # pinned: 0.002, 0.0065, 0.011, 0.0155, then 0.02 until epoch 2, 0.002, 0.0002
    assert lrs[:5] == pytest.approx([0.002, 0.0065, 0.011, 0.0155, 0.02])
    assert lrs[6:] == pytest.approx([0.002] * 3 + [0.0002] * 3)
