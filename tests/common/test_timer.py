from __future__ import annotations

import pytest

import vistrain.common.timer as timer_module
from vistrain.common.timer import Timer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timer_module, "time", fake)
    return fake


def test_elapsed_excludes_paused_time(clock: FakeClock) -> None:
    timer = Timer()
    clock.now += 2.0
    assert timer.elapsed() == pytest.approx(2.0)
    timer.pause()
    clock.now += 50.0
    assert timer.elapsed() == pytest.approx(2.0)
    timer.resume()
    clock.now += 3.0
    assert timer.elapsed() == pytest.approx(5.0)


def test_repeated_pause_and_resume_are_harmless(clock: FakeClock) -> None:
    timer = Timer()
    clock.now += 1.0
    timer.pause()
    clock.now += 10.0
    timer.pause()  # a second validation in a row
    assert timer.elapsed() == pytest.approx(1.0)
    timer.resume()
    clock.now += 1.0
    timer.resume()  # resuming a running timer must not restart the current stretch
    clock.now += 1.0
    assert timer.elapsed() == pytest.approx(3.0)


def test_not_started_timer_counts_nothing_until_resumed(clock: FakeClock) -> None:
    timer = Timer(start=False)
    assert not timer.running
    timer.pause()  # pausing a timer that never ran is a no-op
    clock.now += 5.0
    assert timer.elapsed() == 0.0
    timer.resume()
    clock.now += 2.0
    assert timer.running
    assert timer.elapsed() == pytest.approx(2.0)


def test_start_and_reset_return_to_zero(clock: FakeClock) -> None:
    timer = Timer()
    clock.now += 4.0
    timer.start()
    clock.now += 1.0
    assert timer.elapsed() == pytest.approx(1.0)
    timer.reset()
    clock.now += 1.0
    assert not timer.running
    assert timer.elapsed() == 0.0
