from __future__ import annotations

import pytest
import torch

from vistrain.common.device import resolve_device


def test_cpu_and_device_objects_pass_through() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", ""])
def test_a_name_that_is_not_a_device_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="is not a device; use 'cpu'"):
        resolve_device(name)


def test_a_missing_gpu_is_refused_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:1' asks for a CUDA GPU but none"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"GPU 3 but this machine has 1 \(indices 0..0\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
