"""CPU policy: thread count and the spare-core check both follow affinity and local ranks."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from vistrain.common import cpu


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for name in (*cpu.THREAD_ENVS, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_configure_threads_leaves_a_core_per_loader_worker(two_cores: pytest.MonkeyPatch) -> None:
    assert cpu.configure_threads(0, num_workers=1) == 1 == torch.get_num_threads()
    assert cpu.configure_threads(0, num_workers=0) == 2 == torch.get_num_threads()
    assert cpu.configure_threads(0, num_workers=5) == 1  # at least one
    two_cores.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks share the two cores
    assert cpu.configure_threads(0) == 1


def test_configure_threads_respects_an_explicit_choice(two_cores: pytest.MonkeyPatch) -> None:
    assert cpu.configure_threads(3, num_workers=1) == 3 == torch.get_num_threads()
    torch.set_num_threads(1)
    two_cores.setenv("OMP_NUM_THREADS", "1")
    assert cpu.configure_threads(0) == 1 == torch.get_num_threads()  # left alone


def test_spare_core_counts_every_local_process(two_cores: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    assert cpu.has_spare_core()
    two_cores.setenv("LOCAL_WORLD_SIZE", "2")
    assert not cpu.has_spare_core()
    two_cores.delenv("LOCAL_WORLD_SIZE")
    torch.set_num_threads(2)
    assert not cpu.has_spare_core()
