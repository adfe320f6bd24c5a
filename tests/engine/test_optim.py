from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import StepLR

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
