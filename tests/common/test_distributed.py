from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_utils import run_distributed
from vistrain.common import distributed as vdist


def _collectives(rank: int, world_size: int) -> dict[str, object]:
    tensor = torch.full((3,), float(rank + 1))
    vdist.broadcast(tensor, src=1)
    obj = vdist.broadcast({"from": rank}, src=0)
    gathered = vdist.all_gather_object(rank * 10)
    mean = vdist.all_reduce_dict({"a": torch.tensor(float(rank)), "b": rank * 2}, "mean")
    total = vdist.all_reduce_dict({"a": float(rank + 1)}, "sum")
    vdist.barrier()

    @vdist.rank_zero_only
    def only_zero() -> int:
        return 7

    return {
        "rank": vdist.get_rank(),
        "world": vdist.get_world_size(),
        "tensor": tensor.tolist(),
        "obj": obj,
        "gathered": gathered,
        "mean_a": float(mean["a"]),
        "mean_a_is_tensor": isinstance(mean["a"], torch.Tensor),
        "mean_b": mean["b"],
        "sum_a": total["a"],
        "zero": only_zero(),
    }


def test_collectives_in_two_gloo_processes() -> None:
    results = run_distributed(_collectives, 2)
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        assert res["world"] == 2
        assert res["tensor"] == [2.0, 2.0, 2.0]
        assert res["obj"] == {"from": 0}
        assert res["gathered"] == [0, 10]
        assert res["mean_a"] == pytest.approx(0.5)
        assert res["mean_a_is_tensor"]
        assert res["mean_b"] == pytest.approx(1.0)
        assert res["sum_a"] == pytest.approx(3.0)
    assert results[0]["zero"] == 7
    assert results[1]["zero"] is None


def test_single_process_fallbacks() -> None:
    assert vdist.get_rank() == 0 and vdist.get_world_size() == 1
    assert vdist.all_gather_object(3) == [3]
    assert vdist.broadcast("x") == "x"
    assert vdist.all_reduce_dict({"a": 1.0}) == {"a": 1.0}
    with pytest.raises(ValueError, match="reduce_op"):
        vdist.all_reduce_dict({"a": 1.0}, "max")


def test_unwrap_model_any_depth() -> None:
    inner = nn.Linear(2, 2)
    wrapped = nn.DataParallel(nn.DataParallel(inner))
    assert vdist.unwrap_model(wrapped) is inner
    assert vdist.unwrap_model(inner) is inner
