"""Early stopping, the time budget and time-based checkpoints, on real engines."""

from __future__ import annotations

import os
import time

import pytest

from dist_utils import run_distributed
from trainer_fixtures import ENGINES, ScriptedValidation, run_toy
from vistrain.engine.callbacks import CheckpointCallback, EarlyStoppingCallback
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.checkpoint_io import load_checkpoint
from vistrain.engine.time_budget import parse_max_time

NO_GAIN = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]


def _last(folder) -> dict:
    return load_checkpoint(os.path.join(folder, "checkpoints", "last.ckpt"))


@pytest.mark.parametrize("engine", ENGINES)
def test_early_stopping_stops_after_patience_with_a_final_checkpoint(tmp_path, engine) -> None:
    scripted = ScriptedValidation(NO_GAIN, key="loss")
    stopper = EarlyStoppingCallback(monitor="loss", mode="min", patience=2)
    ckpt = CheckpointCallback(save_prefix=str(tmp_path), checkpoint_period=100)
    run_toy(engine, str(tmp_path), [scripted, stopper, ckpt], num_epochs=10)
    # Validations 1..4: best 0.5 at the 2nd, no gain at the 3rd and 4th -> stop after epoch 3.
    assert scripted.steps == [6, 12, 18, 24]
    state = _last(tmp_path)
    assert state["global_step"] == 24 and state["epoch"] == 3 and state["epoch_finished"]
    # The final file holds the counters after the stopping validation.
    assert state["callbacks"]["EarlyStoppingCallback"]["wait"] == 2
    assert state["callbacks"]["EarlyStoppingCallback"]["best"] == 0.5


def test_resumed_run_keeps_its_patience(tmp_path) -> None:
    """The resumed run stops at the same step as an uninterrupted one (no fresh patience)."""
    straight = ScriptedValidation(NO_GAIN, key="loss")
    run_toy(
        "native",
        str(tmp_path / "straight"),
        [straight, EarlyStoppingCallback(monitor="loss", patience=3)],
        num_epochs=10,
    )
    assert straight.steps == [6, 12, 18, 24, 30]

    part = str(tmp_path / "part")

    def callbacks(scores):
        return [
            ScriptedValidation(scores, key="loss"),
            EarlyStoppingCallback(monitor="loss", patience=3, save_prefix=part),
            CheckpointCallback(save_prefix=part),
        ]

    first = callbacks(NO_GAIN[:3])
    run_toy("native", part, first, num_epochs=3)  # best 0.5, one validation without gain
    # The epoch-2 file was written before that epoch's validation ...
    assert _last(part)["callbacks"]["EarlyStoppingCallback"]["wait"] == 0
    second = callbacks(NO_GAIN[3:])
    run_toy("native", part, second, num_epochs=10, ckpt_path=_ckpt(part, "last.ckpt"))
    # ... yet the resumed run counts it: two more validations without gain end it, as above.
    assert second[0].steps == [24, 30]
    assert _last(part)["global_step"] == 30


def _ckpt(folder: str, name: str) -> str:
    return os.path.join(folder, "checkpoints", name)


def test_early_stopping_refuses_bad_arguments_and_missing_keys(tmp_path) -> None:
    with pytest.raises(ValueError, match="patience"):
        EarlyStoppingCallback(monitor="loss", patience=0)
    with pytest.raises(ValueError, match="mode"):
        EarlyStoppingCallback(monitor="loss", mode="up")
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStoppingCallback(monitor="loss", min_delta=-1.0)
    stopper = EarlyStoppingCallback(monitor="Det/AP", mode="max")
    with pytest.raises(ValueError, match=r"Det/AP.*available: \['loss'\]"):
        run_toy("native", str(tmp_path), [ScriptedValidation([1.0], key="loss"), stopper])


def test_min_delta_counts_small_gains_as_none() -> None:
    stopper = EarlyStoppingCallback(monitor="acc", mode="max", min_delta=0.1)
    stopper.best = 0.5
    assert not stopper.improves(0.55) and stopper.improves(0.65)
    assert not stopper.improves(float("nan"))


def _rank_dependent_scores(rank: int, world_size: int, out: str) -> list[int]:
    # Rank 1 sees ever better values; rank 0's counters decide for both.
    scores = NO_GAIN if rank == 0 else [10.0 - i for i in range(12)]
    scripted = ScriptedValidation(scores, key="loss")
    run_toy(
        "native", out, [scripted, EarlyStoppingCallback(monitor="loss", patience=2)], num_epochs=10
    )
    return scripted.steps


def test_all_ranks_stop_together(tmp_path) -> None:
    steps = run_distributed(_rank_dependent_scores, 2, str(tmp_path))
    assert steps[0] == steps[1] == [6, 12, 18, 24]  # rank 1 alone would never stop


class Sleep(Callback):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


@pytest.mark.parametrize("engine", ENGINES)
def test_max_time_stops_with_a_checkpoint_and_counts_earlier_segments(tmp_path, engine) -> None:
    out = str(tmp_path)
    ckpt = CheckpointCallback(save_prefix=out, checkpoint_period=100)
    run_toy(engine, out, [Sleep(0.05), ckpt], num_epochs=1000, max_time=0.4)
    state = _last(out)
    assert 4 <= state["global_step"] < 40  # stopped by the budget, far before the epochs
    assert state["train_time_s"] >= 0.4
    time.sleep(0.5)  # time between segments is not training time
    resumed = CheckpointCallback(save_prefix=out, checkpoint_period=100)
    run_toy(
        engine, out, [Sleep(0.05), resumed], num_epochs=1000, max_time=0.6,
        ckpt_path=_ckpt(out, "last.ckpt"),
    )  # fmt: skip
    again = _last(out)
    # About 0.2 s were left: a few steps, not the 0.6 s a fresh budget would give.
    assert state["global_step"] < again["global_step"] <= state["global_step"] + 6
    assert 0.6 <= again["train_time_s"] < 1.0


def test_max_time_parsing() -> None:
    assert parse_max_time("00:01:00:30") == 3630.0
    assert parse_max_time(90) == 90.0 and parse_max_time(None) is None
    with pytest.raises(ValueError, match="max_time"):
        parse_max_time("soon")
    with pytest.raises(ValueError, match="positive"):
        parse_max_time(0)


def test_every_n_minutes_saves_inside_epochs(tmp_path) -> None:
    out = str(tmp_path)
    ckpt = CheckpointCallback(save_prefix=out, checkpoint_period=100, every_n_minutes=0.2 / 60)
    run_toy("native", out, [Sleep(0.05), ckpt], num_epochs=1)
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    mid_epoch = [name for name in names if name.startswith("epoch=0-step=")]
    assert 1 <= len(mid_epoch) <= 3  # 6 steps of >= 0.05 s: a save every >= 0.2 s
    assert not load_checkpoint(_ckpt(out, mid_epoch[0]))["epoch_finished"]
    with pytest.raises(ValueError, match="every_n_minutes"):
        CheckpointCallback(save_prefix=out, every_n_minutes=0)


def test_every_n_minutes_reads_the_clock_a_few_times_per_period_and_saves_on_time(
    tmp_path, monkeypatch
) -> None:
    import vistrain.engine.callbacks.checkpoint as checkpoint_module

    class Clock:
        """One step takes 0.1 s; counts the readings."""

        now, readings = 0.0, 0

        def monotonic(self) -> float:
            self.readings += 1
            return self.now

    clock = Clock()
    monkeypatch.setattr(checkpoint_module, "time", clock)
    ckpt = CheckpointCallback(save_prefix=str(tmp_path), checkpoint_period=10**6,
                              every_n_minutes=1.0)  # fmt: skip
    saved: list[int] = []

    def save(state, *args, **kwargs) -> None:  # what _save does to the schedule
        saved.append(state["global_step"])
        ckpt._last_save_time = clock.now

    monkeypatch.setattr(ckpt, "_save", save)

    def train(steps: range, step_s: float) -> None:
        start = clock.now
        for done, step in enumerate(steps, 1):
            clock.now = start + done * step_s
            ckpt.on_train_batch_end({"global_step": step, "step_end": True}, None, None, {}, {}, 0)  # type: ignore[arg-type]

    train(range(1, 1500), 0.1)
    # Due 60 s after the first step (0.1 s), then 60 s after each save: on time to the
    # step, with ~log2(600) + 600 / 100 readings per period instead of one per step.
    assert saved == [601, 1201]
    assert clock.readings < 2.5 * 25
    # From step 1500 on, steps take 1 s: due at 180.1 s, i.e. step 1531; the reading that
    # finds it was scheduled at the old rate, but at most 100 steps ahead.
    train(range(1500, 1701), 1.0)
    assert 1531 <= saved[2] <= 1631
