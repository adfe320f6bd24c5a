"""The shared argument checks: what they accept, and a one-line error naming value and fix."""

from __future__ import annotations

import math

import pytest
import torch

from vistrain.common.checks import (
    check_choice,
    check_finite_float,
    check_list_of,
    check_positive_int,
)
from vistrain.engine.optim import warmup_cosine


def test_positive_int_accepts_counts_and_the_special_values() -> None:
    check_positive_int("num_epochs", 1)
    check_positive_int("num_epochs", -1, {-1: "no limit"})
    check_positive_int("check_val_every_n_epoch", None, {None: "never"})


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, r"num_epochs=0 is invalid; use an int >= 1, or -1 \(no limit\)\."),
        (-2, ValueError, r"num_epochs=-2 is invalid"),
        (True, TypeError, r"num_epochs=True is a bool; use an int >= 1"),
        (2.0, TypeError, r"num_epochs=2.0 is a float"),
        (None, TypeError, r"num_epochs=None is a NoneType"),
    ],
)
def test_positive_int_refuses(value: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_positive_int("num_epochs", value, {-1: "no limit"})


def test_special_values_match_by_type() -> None:
    with pytest.raises(TypeError):  # -1.0 is not the special -1
        check_positive_int("num_steps", -1.0, {-1: "no limit"})
    with pytest.raises(TypeError):  # False is not the special 0
        check_positive_int("every", False, {0: "never"})


def test_finite_float_and_choice() -> None:
    check_finite_float("decay", 0.5, 0.0, 1.0)
    for bad in (math.nan, math.inf, 1.5):
        with pytest.raises(ValueError, match=r"decay=.* is invalid; use a finite number in"):
            check_finite_float("decay", bad, 0.0, 1.0)
    with pytest.raises(TypeError, match=r"decay='0\.5' is a str"):
        check_finite_float("decay", "0.5")
    check_choice("mode", "max", ("min", "max"))
    with pytest.raises(ValueError, match=r"mode='avg' is invalid; use one of 'min', 'max'\."):
        check_choice("mode", "avg", ("min", "max"))


def test_list_of_names_the_bad_item() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert check_list_of("optimizers", opt, torch.optim.Optimizer) == [opt]
    assert check_list_of("optimizers", None, torch.optim.Optimizer) == []
    with pytest.raises(TypeError, match=r"optimizers\[1\] is a str"):
        check_list_of("optimizers", [opt, "sgd"], torch.optim.Optimizer)


def test_schedules_use_the_checks() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"min_lr_factor=nan is invalid"):
        warmup_cosine(opt, 3, 4, min_lr_factor=math.nan)
    with pytest.raises(ValueError, match=r"warmup_steps=-1 is invalid.*0 \(no warm-up\)"):
        warmup_cosine(opt, -1, 4)
