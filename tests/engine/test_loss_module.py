from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from vistrain.engine.connectors import LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule

Terms = namedtuple("Terms", ["cls", "box"])


def _conn() -> LossConnector:
    return LossConnector({"p": pred_key("p"), "t": data_key("t")})


def test_weighted_terms_flattened_names_and_total() -> None:
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    module = LossModule(
        [
            {
                "loss": lambda p, t: ((p - t) ** 2).sum(),
                "connector": _conn(),
                "name": "l2",
                "weight": 0.5,
            },
            {
                "loss": lambda p, t: {"a": p.sum(), "nested": Terms(cls=p.mean(), box=t.sum())},
                "connector": _conn(),
                "name": "multi",
                "weight": {"a": 2.0},
            },
        ],
        exclude_attributes=["box"],
    )
    total, metrics = module({"p": p}, {"t": torch.tensor([0.0, 0.0])})
    assert set(metrics) == {"l2", "multi.a", "multi.nested.cls", "multi.nested.box", "loss"}
    assert metrics["l2"].item() == pytest.approx(2.5)
    assert metrics["multi.a"].item() == pytest.approx(6.0)
    # excluded term is logged but not added
    assert total.item() == pytest.approx(2.5 + 6.0 + 1.5)
    assert not metrics["loss"].requires_grad
    total.backward()
    assert p.grad is not None


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LossModule([])
    with pytest.raises(ValueError, match="'loss' and 'connector'"):
        LossModule([{"loss": lambda: 0}])
    with pytest.raises(TypeError, match="LossConnector"):
        LossModule([{"loss": lambda: 0, "connector": {"p": "x"}}])
    bad = LossModule([{"loss": lambda p, t: 3.0, "connector": _conn()}])
    with pytest.raises(TypeError, match="must return a Tensor"):
        bad({"p": 1}, {"t": 2})
    excluded = LossModule(
        [{"loss": lambda p, t: p, "connector": _conn(), "name": "x"}], exclude_attributes=["x"]
    )
    with pytest.raises(ValueError, match="no loss to optimise"):
        excluded({"p": torch.ones(())}, {"t": 0})


def test_loss_modules_are_registered_and_findable() -> None:
    l1 = torch.nn.L1Loss()
    module = LossModule(
        [
            {
                "loss": l1,
                "connector": LossConnector({"input": pred_key("p"), "target": data_key("t")}),
            }
        ]
    )
    assert module.find_loss(torch.nn.L1Loss) == [l1]
    assert any(m is l1 for m in module.modules())
    assert module.losses[0]["name"] == "L1Loss"


def test_find_loss_looks_inside_wrapped_losses_and_lists_each_once() -> None:
    l1 = torch.nn.L1Loss()
    wrapper = torch.nn.Sequential(torch.nn.Identity(), l1)
    conn = LossConnector({"input": pred_key("p"), "target": data_key("t")})
    module = LossModule(
        [
            {"loss": wrapper, "connector": conn, "name": "wrapped"},
            {"loss": l1, "connector": conn, "name": "again"},
            {"loss": lambda input, target: input, "connector": conn, "name": "plain"},
        ]
    )
    assert module.find_loss(torch.nn.L1Loss) == [l1]
    assert module.find_loss(torch.nn.Sequential) == [wrapper]
    assert module.find_loss(torch.nn.MSELoss) == []


def test_unnamed_terms_are_named_after_the_function_or_class_and_single_term_total_is_shared() -> (
    None
):
    conn = LossConnector({"input": pred_key(""), "target": data_key("y")})
    module = LossModule({"loss": torch.nn.functional.mse_loss, "connector": conn})
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    total, metrics = module(pred, {"y": torch.zeros(2)})
    assert set(metrics) == {"mse_loss", "loss"}
    assert metrics["loss"] is metrics["mse_loss"] and not metrics["loss"].requires_grad
    assert total.requires_grad and float(total.detach()) == 2.5
    # "loss" is the total itself, detached: the loop hands it to the non-finite guard as is
    assert metrics["loss"].data_ptr() == total.data_ptr()
    two = LossModule(
        [
            {"loss": torch.nn.functional.mse_loss, "connector": conn},
            {"loss": torch.nn.L1Loss(), "connector": conn},
        ]
    )
    total, metrics = two(pred, {"y": torch.zeros(2)})
    assert float(metrics["loss"]) == 2.5 + 1.5
    assert metrics["loss"].data_ptr() == total.data_ptr() and not metrics["loss"].requires_grad
    assert float(metrics["L1Loss"]) == 1.5


@pytest.mark.parametrize("weight", ["2", None, True, {"cls": "x"}, torch.ones(2)])
def test_a_weight_that_is_not_a_number_is_refused_when_built(weight) -> None:
    conn = LossConnector({"input": pred_key(""), "target": data_key("y")})
    with pytest.raises(TypeError, match="'weight' must be a number"):
        LossModule({"loss": torch.nn.functional.mse_loss, "connector": conn, "weight": weight})


def test_numpy_and_tensor_weights_are_numbers() -> None:
    import numpy as np

    conn = LossConnector({"input": pred_key(""), "target": data_key("y")})
    for weight in (np.float32(2.0), torch.tensor(2.0), 2):
        module = LossModule(
            {"loss": torch.nn.functional.mse_loss, "connector": conn, "weight": weight}
        )
        total, _ = module(torch.ones(2), {"y": torch.zeros(2)})
        assert float(total) == 2.0


def test_a_term_that_is_not_a_scalar_is_named_in_the_error() -> None:
    conn = LossConnector({"input": pred_key(""), "target": data_key("y")})
    module = LossModule({"loss": torch.nn.MSELoss(reduction="none"), "connector": conn})
    with pytest.raises(ValueError, match=r"'MSELoss' has shape \(2,\).*reduction='mean'"):
        module(torch.ones(2), {"y": torch.zeros(2)})

    def grows(input, target):  # a dict term that appears later and is not reduced
        out = {"main": ((input - target) ** 2).mean()}
        if input.shape[0] > 2:
            out["extra"] = input - target
        return out

    module = LossModule({"loss": grows, "connector": conn})
    module(torch.ones(2), {"y": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"'grows.extra' has shape \(3,\)"):
        module(torch.ones(3), {"y": torch.zeros(3)})


@pytest.mark.parametrize(
    ("weight", "name"), [(1.0, None), (0.5, None), (2.0, "loss"), ({"mse_loss": 3.0}, None)]
)
def test_a_one_entry_module_gives_the_first_steps_result_on_later_steps(weight, name) -> None:
    """Later steps of a one-entry module skip the term loop; they must not differ from it."""
    conn = LossConnector({"input": pred_key(""), "target": data_key("y")})
    entry = {"loss": torch.nn.functional.mse_loss, "connector": conn, "weight": weight}
    if name is not None:
        entry["name"] = name
    module = LossModule(entry)
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    results = [module(pred, {"y": torch.zeros(2)}) for _ in range(3)]
    first_total, first_metrics = results[0]
    for total, metrics in results[1:]:
        assert list(metrics) == list(first_metrics)
        assert all(torch.equal(metrics[k], first_metrics[k]) for k in metrics)
        assert torch.equal(total, first_total) and total.requires_grad
        assert metrics["loss"].data_ptr() == total.data_ptr()
        assert not any(value.requires_grad for value in metrics.values())
        total.backward()
    assert torch.equal(pred.grad, 2 * torch.autograd.grad(first_total, pred)[0])  # same graph


def test_a_one_entry_module_whose_loss_changes_its_return_type_later_is_still_summed() -> None:
    """A loss that returns a dict only from its second call on (the YOLOX L1 switch, say)."""
    calls = []

    def loss(input, target):
        calls.append(1)
        value = ((input - target) ** 2).mean()
        return value if len(calls) == 1 else {"a": value, "b": 2 * value}

    conn = LossConnector({"input": pred_key(""), "target": data_key("y")})
    module = LossModule({"loss": loss, "connector": conn, "name": "det"}, ["b"])
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    _, metrics = module(pred, {"y": torch.zeros(2)})
    assert set(metrics) == {"det", "loss"}
    total, metrics = module(pred, {"y": torch.zeros(2)})
    assert set(metrics) == {"det.a", "det.b", "loss"} and len(calls) == 2
    assert float(total.detach()) == 2.5 and float(metrics["det.b"]) == 5.0  # "b" logged only


def test_a_one_entry_module_whose_only_term_is_excluded_is_refused_every_step() -> None:
    conn = LossConnector({"input": pred_key(""), "target": data_key("y")})
    module = LossModule({"loss": torch.nn.functional.mse_loss, "connector": conn}, ["mse_loss"])
    for _ in range(2):
        with pytest.raises(ValueError, match="no loss to optimise"):
            module(torch.ones(2), {"y": torch.zeros(2)})
