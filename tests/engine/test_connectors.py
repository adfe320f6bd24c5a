from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from vistrain.engine.connectors import (
    CallbackConnector,
    DataConnector,
    LossConnector,
    data_key,
    get_nested,
    pred_key,
    remap_pred_keys,
)

Head = namedtuple("Head", ["boxes", "scores"])


def test_dotted_paths_into_dicts_namedtuples_and_lists() -> None:
    outputs = {"det": Head(boxes=torch.ones(2, 4), scores=torch.zeros(2)), "levels": [1, 2]}
    batch = {"targets": {"boxes": [torch.zeros(1, 4)]}, "a.b": 5}
    conn = LossConnector(
        {
            "boxes": pred_key("det.boxes"),
            "lvl": pred_key("levels.1"),
            "gt": data_key("targets.boxes.0"),
            "dotted": data_key("a.b"),
        }
    )
    out = conn(outputs, batch)
    assert torch.equal(out["boxes"], torch.ones(2, 4))
    assert out["lvl"] == 2
    assert out["gt"].shape == (1, 4)
    assert out["dotted"] == 5


def test_missing_key_names_key_and_lists_available() -> None:
    conn = CallbackConnector({"boxes": pred_key("det.boxez")})
    outputs = {"det": Head(boxes=1, scores=2)}
    with pytest.raises(KeyError, match=r"det\.boxez.*boxez.*\['boxes', 'scores'\]"):
        conn(outputs, {})
    with pytest.raises(KeyError, match=r"'images'.*\['img'\]"):
        DataConnector({"images": "images"})({"img": 1})


def test_list_batches_multi_view() -> None:
    views = [{"images": 1, "hw": (2, 2)}, {"images": 3, "hw": (4, 4)}]
    assert DataConnector({"x": "images"})(views) == [{"x": 1}, {"x": 3}]
    assert LossConnector({"x": data_key("images")})({}, views) == {"x": [1, 3]}


def test_remap_pred_keys_and_validation() -> None:
    mapping = {"a": pred_key("boxes"), "b": data_key("images")}
    remapped = remap_pred_keys(mapping, "head")
    assert remapped == {"a": pred_key("head.boxes"), "b": data_key("images")}
    with pytest.raises(TypeError, match="data_key"):
        LossConnector({"a": "boxes"})
    with pytest.raises(ValueError, match="source"):
        LossConnector({"a": {"key": "x", "source": "model"}})
    with pytest.raises(TypeError):
        DataConnector(["x"])
    assert get_nested({"x": {"y": 1}}, "x.y") == 1


def test_empty_key_is_the_whole_object_and_mapping_subclasses_work() -> None:
    from collections import OrderedDict

    tensor = torch.ones(3)
    assert LossConnector({"input": pred_key("")})(tensor, {})["input"] is tensor
    ordered = OrderedDict(x=OrderedDict(y=7))
    assert DataConnector({"v": "x.y"})(ordered) == {"v": 7}
    assert DataConnector({"v": "x"})(ordered) == {"v": ordered["x"]}


def test_key_mapping_is_read_only_and_reassigning_rebuilds_the_lookup() -> None:
    conn = LossConnector({"a": data_key("x")})
    with pytest.raises(TypeError):
        conn.key_mapping["a"] = data_key("y")  # type: ignore[index]
    conn.key_mapping = {"a": data_key("y")}
    assert conn({}, {"x": 1, "y": 2}) == {"a": 2}
    with pytest.raises(TypeError, match="data_key"):
        conn.key_mapping = {"a": "y"}  # type: ignore[dict-item]
    assert conn({}, {"x": 1, "y": 2}) == {"a": 2}, "a rejected mapping must leave the old one"

    data_conn = DataConnector({"inp": "x"})
    data_conn.key_mapping = {"inp": "y"}
    assert data_conn({"x": 1, "y": 2}) == {"inp": 2}
    with pytest.raises(TypeError, match=r"'inp'.*string"):
        DataConnector({"inp": 3})  # type: ignore[dict-item]


def test_the_per_step_shortcuts_read_as_get_nested_does() -> None:
    """Connectors read a key present verbatim without get_nested; every other case is its."""
    batch = {"a.b": 1, "a": {"b": 2}, "": "empty key", "views": [{"y": 3}]}
    assert DataConnector({"verbatim": "a.b", "all": ""})(batch) == {"verbatim": 1, "all": batch}
    assert DataConnector({"nested": "a.b"})({"a": {"b": 2}}) == {"nested": 2}
    assert DataConnector({"v": "views.0.y"})(batch) == {"v": 3}
    loss = LossConnector(
        {"whole": pred_key(""), "verbatim": data_key("a.b"), "dotted": pred_key("a.b")}
    )
    prediction = {"a": {"b": 5}, "": "not this"}
    assert loss(prediction, batch) == {"whole": prediction, "verbatim": 1, "dotted": 5}
    assert loss(prediction, [batch, {"a.b": 9}])["verbatim"] == [1, 9]
    with pytest.raises(KeyError, match="'x' is missing"):
        LossConnector({"v": data_key("x")})({}, batch)
    with pytest.raises(KeyError, match="'x' is missing"):
        DataConnector({"v": "x"})(batch)
